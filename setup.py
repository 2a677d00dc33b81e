"""Builds the compiled receive loop of the DICOM fast path (mdm/dicom/fast/_pdata.pyx) with
Cython; everything else is declared in pyproject.toml. The bridge runs without the extension
(on the Python fast path) if it is absent."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("mdm.dicom.fast._pdata", ["mdm/dicom/fast/_pdata.pyx"])],
        compiler_directives={"language_level": "3"},
    )
)
