"""Ray: a transport for actors on a Ray cluster (``transport``), a server
hosted in a Ray actor (``service``), the runtime they share (``runtime``)."""
