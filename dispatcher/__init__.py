"""Appeal dispatch service: signed appeals in, letters to officials out, every step in the ledger."""

__version__ = "0.1.0"
