"""sipcluster: a horizontally scalable SIP B2BUA and registrar."""
