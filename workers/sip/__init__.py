"""The SIP worker process: registrar, digest authentication, B2BUA."""
