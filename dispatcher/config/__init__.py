"""Configuration: campaigns, targets and sections, read from config/ and cross-checked.

``models`` (the validated shapes) sits below the channel packages, which read their sections'
tables from it; ``loader`` sits above them, since it checks every channel a file names against
a channel registry. So this package's face imports neither: import the module you need.
"""
