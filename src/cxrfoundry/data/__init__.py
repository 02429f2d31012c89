"""data package of cxrfoundry."""
