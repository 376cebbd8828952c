"""Readers and writers of MRI data (ACDC NIfTI, fastMRI HDF5, folders), the embedded-default
generators, prepared HDF5 files and torch datasets."""
