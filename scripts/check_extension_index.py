"""Run the Slicer Extensions Index's own checks (``scripts/check_description_files.py`` of Slicer/ExtensionsIndex)
on this extension's description file ``ACSGRegistration.json``, before the extension is submitted.

    python scripts/check_extension_index.py PATH/TO/ExtensionsIndex      # a checkout of Slicer/ExtensionsIndex

The index's script clones the repository named in ``scm_url`` and downloads the schema, the icon and the
screenshots. Here, without a network, the "clone" is this repository's committed tree (``git archive HEAD``:
what a clone would hold) and downloads are answered from files: the schema from the index's ``schemas/``
folder, raw.githubusercontent.com URLs of this repository from the committed tree (so a URL works exactly when
it names a committed image). The one check that needs GitHub's API (the repository's topics) is reported as
not run. Needs ``pip install jsonschema requests`` (the index's own requirements). Exit code 1 when a check fails.
"""

import argparse
import importlib.util
import io
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ACSGRegistration"


class Response:
    """What the index's script reads of a ``requests`` response."""

    def __init__(self, url, status, content=b"", content_type=""):
        self.url, self.status_code, self.content = url, status, content
        self.headers = {"Content-Type": content_type}
        self.text = content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)

    def raise_for_status(self):
        if self.status_code >= 400:
            import requests
            raise requests.HTTPError(f"{self.status_code} for {self.url}", response=self)


def committed_tree(target):
    """This repository's committed files (what cloning it gives) extracted into ``target``."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", "HEAD"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")


def offline_get(index, tree, scm_url):
    """``requests.get`` answered from files: the index's schemas, and this repository's committed tree for its
    raw.githubusercontent.com URLs (any branch or revision)."""
    owner_repo = urllib.parse.urlsplit(scm_url).path.strip("/").removesuffix(".git")

    def get(url, *args, **kwargs):
        parts = urllib.parse.urlsplit(url)
        path = parts.path.strip("/")
        if path.endswith(".json") and "/Schemas/" in url:
            local = os.path.join(index, "schemas", os.path.basename(path))
        elif parts.netloc == "raw.githubusercontent.com" and path.startswith(owner_repo + "/"):
            local = os.path.join(tree, path[len(owner_repo) + 1:].split("/", 1)[-1])
        else:
            return Response(url, 599, b"not available offline")
        if not os.path.isfile(local):
            return Response(url, 404, b"404: Not Found", "text/plain")
        with open(local, "rb") as fh:
            return Response(url, 200, fh.read(), mimetypes.guess_type(local)[0] or "application/octet-stream")
    return get


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", help="a checkout of Slicer/ExtensionsIndex")
    args = parser.parse_args(argv)
    script = os.path.join(args.index, "scripts", "check_description_files.py")
    if not os.path.isfile(script):
        parser.error(f"{script} not found: give a checkout of Slicer/ExtensionsIndex")
    spec = importlib.util.spec_from_file_location("check_description_files", script)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    if checks.jsonschema is None or checks.requests is None:
        sys.exit("the index's checks need: pip install jsonschema requests")
    work = tempfile.mkdtemp(prefix="acsg-index-check-")
    try:
        # The index folder with this description added (the dependency check reads every description).
        folder = os.path.join(work, "index")
        shutil.copytree(args.index, folder, ignore=shutil.ignore_patterns(".git"))
        shutil.copy(os.path.join(ROOT, f"{NAME}.json"), folder)
        tree = os.path.join(work, "clone")
        committed_tree(tree)
        description = os.path.join(folder, f"{NAME}.json")
        metadata = checks.parse_json(description)
        checks.requests.get = offline_get(folder, tree, metadata["scm_url"])
        failed = 0
        for title, check, kwargs in (
                ("Check repository size", checks.check_repository_size, {"cloned_repository_folder": tree}),
                ("Check JSON schema", checks.check_json_schema, {}),
                ("Check JSON file format", checks.check_json_file_format, {"extension_file_path": description}),
                ("Check extension name", checks.check_extension_name, {}),
                ("Check category", checks.check_category, {}),
                ("Check git repository name", checks.check_git_repository_name, {}),
                ("Check SCM URL syntax", checks.check_scm_url_syntax, {}),
                ("Check CMakeLists.txt content", checks.check_cmakelists_content, {"cloned_repository_folder": tree}),
                ("Check license file", checks.check_license_file, {"cloned_repository_folder": tree})):
            try:
                check(NAME, metadata, **kwargs)
                print(f"passed  {title}")
            except checks.ExtensionCheckError as exc:
                failed += 1
                print(f"FAILED  {title}: {exc}")
        cwd = os.getcwd()
        try:
            os.chdir(folder)
            checks.check_dependencies(".")
            print("passed  Extension dependencies")
        except checks.ExtensionDependencyError as exc:
            failed += 1
            print(f"FAILED  Extension dependencies: {exc}")
        finally:
            os.chdir(cwd)
        print("not run Check git repository topics (needs GitHub's API: add the topic '3d-slicer-extension')")
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
