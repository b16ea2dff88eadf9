"""The server: the public :class:`InferenceServer` (``server``) and its
statistics (``stats``)."""
