"""The Slicer module's helpers, bound to Slicer (MRML nodes, Qt settings, PythonSlicer); the module file
``ACSGRegistration.py`` orchestrates them and the backend ``ACSGRegistrationLib`` does the work."""
