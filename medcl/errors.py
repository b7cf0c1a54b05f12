"""The base of every error a user can fix (bad config, data, image, package): the CLI prints its
message as one line and exits 2, the service turns the image ones into 4xx answers."""


class MedclError(Exception):
    """An error caused by input the user can correct; its message says what and where."""
