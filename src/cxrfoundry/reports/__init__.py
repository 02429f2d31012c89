"""reports package of cxrfoundry."""
