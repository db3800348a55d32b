"""The one base of the errors a user can fix (bad settings, missing files, no network).

Light on purpose: the CLI catches these without importing torch, so quick commands stay quick.
"""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names the problem and the fix. The CLI
    prints it on one line and exits with status 2."""
