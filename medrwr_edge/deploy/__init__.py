"""Deployment to offline workstations: signed deployment bundles (`bundle.py`, `signing.py`, the stdlib-only
`verify_and_install.py` that travels inside each bundle) and the `doctor` self-check (`doctor.py`)."""
