"""eval package of cxrfoundry."""
