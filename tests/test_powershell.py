"""PowerShell/Setup-ImageSimilarity.ps1: valid PowerShell (tree-sitter grammar), runs SQLR/ in numbered order."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import tree_sitter
import tree_sitter_powershell

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "PowerShell" / "Setup-ImageSimilarity.ps1"
PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))


def parse(source: bytes) -> tree_sitter.Node:
    return PARSER.parse(source).root_node


def nodes(node: tree_sitter.Node, kind: str) -> list[tree_sitter.Node]:
    found = [node] if node.type == kind else []
    for child in node.children:
        found += nodes(child, kind)
    return found


def test_setup_script_parses_without_errors():
    source = SCRIPT.read_bytes()
    assert not parse(source).has_error
    assert parse(source.replace(b"if ($batch.Trim()) {", b"if ($batch.Trim() {")).has_error  # the grammar bites


def test_setup_script_runs_the_sql_scripts_in_numbered_order():
    (loop,) = [n for n in nodes(parse(SCRIPT.read_bytes()), "foreach_statement")
               if b"Invoke-SqlScript" in n.text]
    source = loop.text.decode()
    header = source[: source.index("{")]
    assert "$SqlDir" in header and re.search(r"\|\s*Sort-Object Name\s*\)", header)
    pattern = re.search(r"-Filter '([^']+)'", header).group(1)
    chosen = sorted(p.name for p in (ROOT / "SQLR").iterdir() if fnmatch.fnmatch(p.name, pattern))
    assert chosen[:9] == [f"{n:02d}_{name}.sql" for n, name in enumerate(
        ["CreateDatabase", "Tables", "AddImage", "FeaturizeImages", "PrepareData", "TrainModel", "EvaluateModel",
         "RankCandidates", "Initial_Run_Once"], start=1)]
    assert "11_ComputeNeighbors.sql" in chosen  # issue 17
    assert "FileTable_Optional.sql" not in chosen


def test_setup_script_supports_whatif_and_guards_every_step():
    text = SCRIPT.read_text()
    assert "SupportsShouldProcess = $true" in text and "$PSCmdlet.ShouldProcess(" in text
    assert "$ErrorActionPreference = 'Stop'" in text and "IsInRole" in text
    steps = re.findall(r"^\s*Invoke-Step ['\"]([^'\"]+)", text, re.MULTILINE)
    assert [s.split()[0] for s in steps] == ["enable", "install", "run", "load", "run"]
    assert "'external scripts enabled', 1" in text and "dbo.Initial_Run_Once" in text
    # what it prints or throws never contains the credential or the connection string
    printed = [re.split(r"Write-\w+|throw ", line, maxsplit=1)[-1] for line in text.splitlines()
               if re.search(r"Write-(Host|Output|Verbose)|throw ", line)]
    assert printed and not any(re.search(r"\$Credential|Password|ConnectionString", line) for line in printed)
