"""The Patient Service: patient identities and records, over Nameko RPC."""
