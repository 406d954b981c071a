"""The extension's description (CMakeLists.txt, ACSGRegistration.s4ext, ACSGRegistration.json) is what the Slicer
Extensions Index accepts: every URL names a file of this repository, contributors are "Name (Organisation)",
a licence is present for the code and one for the weights. With a checkout of Slicer/ExtensionsIndex
(``ACSG_EXTENSIONS_INDEX``), the index's own checks are run too (scripts/check_extension_index.py)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

RAW = "https://raw.githubusercontent.com/"


def cmake_value(name):
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    match = re.search(rf'set\({name}\s+"([^"]*)"', text)
    assert match, name
    return match.group(1)


def s4ext():
    entries = {}
    for line in open(os.path.join(ROOT, "ACSGRegistration.s4ext")):
        if line.strip() and not line.startswith("#"):
            key, _, value = line.strip().partition(" ")
            entries[key] = value.strip()
    return entries


def repository_file(url):
    """The file of this repository a raw.githubusercontent.com URL of the extension's repository names."""
    homepage = cmake_value("EXTENSION_HOMEPAGE")
    owner_repo = homepage.split("github.com/")[1].strip("/")
    assert url.startswith(RAW + owner_repo + "/"), url
    return os.path.join(ROOT, url[len(RAW + owner_repo) + 1:].split("/", 1)[1])


def test_every_url_names_a_committed_image_of_this_repository():
    urls = [cmake_value("EXTENSION_ICONURL")] + cmake_value("EXTENSION_SCREENSHOTURLS").split()
    assert len(urls) >= 2
    for url in urls:
        path = repository_file(url)
        assert os.path.isfile(path), f"{url} names {path}, which does not exist"
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
    tracked = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True).stdout.split()
    if tracked:  # a git checkout: the images must be committed, not only present here
        for url in urls:
            assert os.path.relpath(repository_file(url), ROOT) in tracked, url
    entries = s4ext()
    assert entries["iconurl"] == cmake_value("EXTENSION_ICONURL")
    assert entries["screenshoturls"].split() == cmake_value("EXTENSION_SCREENSHOTURLS").split()


def test_description_files_agree_and_name_contributors_with_their_organisation():
    description = json.load(open(os.path.join(ROOT, "ACSGRegistration.json")))
    entries = s4ext()
    assert description["category"] == entries["category"] == cmake_value("EXTENSION_CATEGORY")
    assert description["scm_url"].rstrip("/").removesuffix(".git") == entries["scmurl"].removesuffix(".git")
    assert description["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git").startswith("Slicer")
    assert description["build_dependencies"] == entries["depends"].split() == cmake_value("EXTENSION_DEPENDS").split()
    project = re.search(r"project\((\w+)\)", open(os.path.join(ROOT, "CMakeLists.txt")).read()).group(1)
    assert project == "ACSGRegistration" == os.path.splitext("ACSGRegistration.json")[0]
    for contributors in (cmake_value("EXTENSION_CONTRIBUTORS"), entries["contributors"]):
        for person in contributors.split("), "):
            assert re.fullmatch(r"[^()]+ \([^()]+\)?", person.strip()), contributors
    with open(os.path.join(ROOT, "ACSGRegistration.json"), "rb") as fh:
        assert b"\r" not in fh.read()


def test_licences_for_code_and_weights():
    assert "BSD 3-Clause" in open(os.path.join(ROOT, "LICENSE")).read()
    weights = os.path.join(ROOT, "ACSGRegistration", "Resources", "Models", "LICENSE-weights.md")
    text = open(weights).read()
    for model in os.listdir(os.path.dirname(weights)):
        if model.endswith(".pt"):
            assert f"`{model}`" in text, f"{model} has no stated licence"
    assert "CC BY-NC-SA 4.0" in text and "LICENSE-weights.md" in open(os.path.join(ROOT, "LICENSE")).read()


def test_the_extensions_index_checks_pass():
    index = os.environ.get("ACSG_EXTENSIONS_INDEX")
    if not index:
        pytest.skip("set ACSG_EXTENSIONS_INDEX to a checkout of Slicer/ExtensionsIndex to run its checks")
    python = os.environ.get("ACSG_INDEX_PYTHON") or shutil.which("python3.12") or sys.executable
    done = subprocess.run([python, os.path.join(ROOT, "scripts", "check_extension_index.py"), index],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout
