"""The server: the public :class:`InferenceServer` facade (``server``), its
worker loop (``loop``), its runs and the exit hook (``lifecycle``), its
policy version and model lock (``version``) and its statistics (``stats``)."""
