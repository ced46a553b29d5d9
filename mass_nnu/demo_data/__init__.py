"""Embedded demo data: MNI152-based MRI cohorts (from nilearn's wheel) and a CT-like phantom. No downloads."""
