"""models package of cxrfoundry."""
