"""generate package of cxrfoundry."""
