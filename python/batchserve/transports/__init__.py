"""Transports: the declared interface and the actor-side client (``base``),
the transports whose queue is the C++ core (``native``), in-process threads
(``threading``) and other processes through shared-memory slots
(``shared_memory``)."""
