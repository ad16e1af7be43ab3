"""The sans-IO SIP core: bytes and events in, bytes and actions out.

Nothing in this package may touch sockets, Redis, gevent, the clock or a
random source; callers pass clocks and random bytes in.  A unit test scans
the imports to keep it that way.
"""
