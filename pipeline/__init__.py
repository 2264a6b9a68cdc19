"""modicscan: lumbar spine MRI -> per-vertebra marrow edema and Modic type (research use only)."""

__version__ = "0.1.0"

DISCLAIMER = (
    "Research output only. modicscan is not a medical device and has not been cleared or approved for clinical use; "
    "its findings are automated estimates that must not be used for diagnosis or treatment decisions. "
    "Pattern flags mark findings for expert review and are never a diagnosis."
)
