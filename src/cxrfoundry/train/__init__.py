"""train package of cxrfoundry."""
