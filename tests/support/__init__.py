"""Helpers shared by test modules: real servers and builders, no mocks of our own code."""
