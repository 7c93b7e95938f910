"""dicom-deid: de-identify DICOM at national scale with Apache Beam.

setup.py (not only pyproject) because Dataflow's --setup_file expects one.
"""

from setuptools import find_packages, setup

about = {}
with open("dicom_deid/__init__.py") as f:
    for line in f:
        if line.startswith("__version__"):
            exec(line, about)

INSTALL_REQUIRES = [
    "apache-beam==2.77.0",
    "pydicom==3.0.2",
    "pyarrow==25.0.1",
    "numpy==2.4.6",
    "PyYAML==6.0.4",
]

EXTRAS = {
    # pixel codecs (permissive licences only; pylibjpeg-libjpeg is GPL and not listed)
    "codecs": ["pylibjpeg==2.1.0", "pylibjpeg-openjpeg==2.6.0", "pyjpegls==1.5.1"],
    # google-cloud-secret-manager: --key gcpsm://... (not pulled in by apache-beam[gcp])
    "gcp": ["apache-beam[gcp]==2.77.0", "google-cloud-storage==3.17.1", "google-cloud-secret-manager==2.32.0"],
    "aws": ["apache-beam[aws]==2.77.0", "boto3==1.44.8"],
    "tests": ["pytest==9.2.0", "pytest-timeout==2.4.0", "duckdb==2.0.1", "pandas==3.1.1",
              "highdicom==0.28.2",
              # static checks of templates/ and terraform/ (tests/infra)
              "python-hcl2==8.1.4",
              # storage tests: Beam's GCS and S3 filesystems against real local servers
              "apache-beam[gcp,aws]==2.77.0", "google-cloud-storage==3.17.1", "boto3==1.44.8",
              "google-cloud-secret-manager==2.32.0",  # gcpsm:// keys against a local gRPC server
              "moto[server]==5.2.5", "gcp-storage-emulator==2026.7.19"],
}

setup(
    name="dicom-deid",
    version=about["__version__"],
    description="De-identify DICOM objects at scale with Apache Beam (PS3.15 Annex E)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dicom_deid", "dicom_deid.*"]),
    include_package_data=True,
    package_data={"dicom_deid": ["data/*.md", "data/**/*", "data/policies/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["dicom-deid=dicom_deid.cli:entry"]},
)
