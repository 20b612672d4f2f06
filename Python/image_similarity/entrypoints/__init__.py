"""What people call: the command line and the web service."""
