"""Ray: a transport for actors on a Ray cluster and a server hosted in a Ray
actor (``transport``)."""
