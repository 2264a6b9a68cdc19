"""Stage 6: what a study's analysis writes.

``json_report`` (report.json and error records), ``schema`` (the published JSON Schemas in ``schemas/``),
``identity`` (study keys, pseudonymisation), ``overlays`` (PNG pictures), ``study_outputs`` (a study's extra
files), ``dicom_export`` (DICOM SEG + SR), ``cohort`` (cohort tables and prevalence summary of a batch).
"""
