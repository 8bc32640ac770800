"""The ``kr`` command line: everything a user does, and the daemons themselves."""
