"""The module's sample data in Slicer's Sample Data module: the public TotalSegmentator example CT (3 mm, L1-L5 in
view) and its vertebra label map (TotalSegmentator's label ids: 27 = L5 ... 31 = L1, 32 = T12), downloaded from
TotalSegmentator's repository (Apache-2.0) when the user picks them. Two samples, so that the label map loads as a
label map volume, whose vertebra levels the panel lists (its colour table or the label convention)."""

import os

# TotalSegmentator's test reference files (wasserth/TotalSegmentator, Apache-2.0): the CT and its segmentation.
TOTALSEGMENTATOR_FILES = "https://raw.githubusercontent.com/wasserth/TotalSegmentator/master/tests/reference_files/"
SAMPLES = (
    {"sampleName": "ACSG spine CT (TotalSegmentator example)",
     "uris": TOTALSEGMENTATOR_FILES + "example_ct.nii.gz", "fileNames": "TotalSegmentatorExampleCT.nii.gz",
     "nodeNames": "TotalSegmentatorExampleCT", "loadFileType": "VolumeFile"},
    {"sampleName": "ACSG spine vertebra labels (TotalSegmentator example)",
     "uris": TOTALSEGMENTATOR_FILES + "spine_report/example_ct_report/totalseg.nii.gz",
     "fileNames": "TotalSegmentatorExampleLabels.nii.gz", "nodeNames": "TotalSegmentatorExampleLabels",
     "loadFileType": "VolumeFile", "loadFileProperties": {"labelmap": True}},
)
CATEGORY = "ACSG Registration"


def registerWhenStarted() -> None:
    """Register the samples once Slicer's start-up is complete (the scripted-module template's pattern); Slicer's
    Python without its Qt application (PythonSlicer scripts) has no start-up to wait for and no Sample Data."""
    import slicer
    app = getattr(slicer, "app", None)
    if app is not None and hasattr(app, "connect"):
        app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> bool:
    """Register the samples with the Sample Data module (Slicer calls this once its start-up is complete);
    False where that module is not there."""
    try:
        import SampleData
    except ImportError:
        return False
    icon = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "Icons",
                        "ACSGRegistration.png")
    for sample in SAMPLES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(category=CATEGORY, thumbnailFileName=icon, **sample)
    return True
