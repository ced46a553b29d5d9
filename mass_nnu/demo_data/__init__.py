"""Demo data: MNI152-based MRI cohorts (from nilearn's wheel), an atlas set whose labels come from Debian's
mricron-data (fetched only on request, tissue labels otherwise), and a CT-like phantom."""
