"""PowerShell/Setup-ImageSimilarity.ps1 without PowerShell: a real grammar (tree-sitter), and static checks of
what would break on a real server, with the documented semantics of the cmdlets it relies on emulated."""
from __future__ import annotations

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


def commands(name: str) -> list[str]:
    """The text of every call of the cmdlet `name` in the script."""
    return [n.text.decode() for n in nodes(parse(SCRIPT.read_bytes()), "command")
            if n.children and n.children[0].text.decode().lower() == name.lower()]


def test_setup_script_parses_without_errors():
    source = SCRIPT.read_bytes()
    assert not parse(source).has_error
    assert parse(source.replace(b"if ($code -ne 0 -and", b"if ($code -ne 0 -and (")).has_error  # the grammar bites


def test_sql_server_work_is_left_to_the_deploy_command():
    """Issue 27: the setup runs no SQLR\\ script, loads no image and runs no procedure itself: it calls
    `image-similarity sqlserver deploy` (tests/test_sqlserver_deploy.py runs that call on the emulated server)."""
    text = SCRIPT.read_text()
    assert "$SqlDir" not in " ".join(commands("Get-ChildItem")) and "Invoke-Batch $Database" not in text
    assert re.search(r"Invoke-Native \$Python @\('-m', 'image_similarity.entrypoints.cli', 'sqlserver', 'deploy'", text)


def test_python_runtime_is_found_for_the_named_instance_per_version():
    """Defect 2: PYTHON_SERVICES sits beside ...\\MSSQL, not in it; the instance is the one -Server names;
    SQL Server 2022+ use the Python 3.10 runtime registered with RegisterRext.exe."""
    text = SCRIPT.read_text()
    assert "'Instance Names\\SQL'" in text and "$ids.$Instance" in text
    assert re.search(r"InstanceRoot = \(Split-Path -Parent \$sqlPath\)", text)
    (bundled,) = [c for c in commands("Join-Path") if "PYTHON_SERVICES" in c]
    assert bundled.startswith("Join-Path $script:Folder.InstanceRoot")
    assert re.search(r"Invoke-Native \$registerRext @\('/configure', \"/pythonhome:\$PythonHome\", "
                     r"\"/instance:\$Instance\"\)", text)
    # the instance comes from -Server: host\INSTANCE, or the default instance
    assert "($Server -split ',')[0] -split '\\\\'" in text and "return 'MSSQLSERVER'" in text


def test_old_versions_fail_early_and_the_package_installs_the_supported_way():
    """Defect 3: SQL Server 2019's Python 3.7 cannot host the package; pip --upgrade under revoscalepy."""
    text = SCRIPT.read_text()
    gate = text.index("$script:MajorVersion -in 14, 15")
    first_change = min(text.index(f"Invoke-Step \"{s}") for s in ("install Python", "deploy into"))
    assert gate < first_change and "Python 3.5/3.7" in text[gate:first_change] and "2022 or 2025" in text[gate:]
    assert "--upgrade" not in text and re.search(r"Invoke-Native \$Python @\('-m', 'pip', 'install', '--no-input'.*"
                                                  r"\"\$RepoRoot\[mssql\]\"\)", text)
    assert "$version.Minor -ne 10" in text and "Test-PythonImport $Python 'revoscalepy'" in text
    # issue 27, defect 2: both pip steps hold numpy at revoscalepy's 1.22.0 and the rest at the resolved versions
    installs = re.findall(r"Invoke-Native \$Python @\('-m', 'pip', 'install', '--no-input', '-c', \$Constraints", text)
    assert len(installs) == 2 and "$Constraints = Join-Path $PSScriptRoot 'constraints-sqlserver.txt'" in text
    pins = (ROOT / "PowerShell" / "constraints-sqlserver.txt").read_text()
    assert re.search(r"^numpy==1\.22\.0$", pins, re.MULTILINE) and re.search(r"^torch==2\.13\.0$", pins, re.MULTILINE)


def test_enabling_external_scripts_restarts_and_checks_value_in_use():
    """Defect 4: the setting takes effect only after the engine and Launchpad restart."""
    text = SCRIPT.read_text()
    enable = text.index("'external scripts enabled', 1")
    restarts = [m.start() for m in re.finditer(r"Restart-Service -Name \$Services\[(\d)\]", text)]
    check = text.index("value_in_use", enable)
    assert len(restarts) == 2 and enable < restarts[0] < restarts[1] < check
    assert "return @('MSSQLSERVER', 'MSSQLLaunchpad')" in text and 'MSSQLLaunchpad`$$Instance' in text


def test_setup_script_supports_whatif_and_guards_every_step():
    text = SCRIPT.read_text()
    assert "SupportsShouldProcess = $true" in text and "$PSCmdlet.ShouldProcess(" in text
    assert "$ErrorActionPreference = 'Stop'" in text and "IsInRole" in text
    steps = re.findall(r"^\s*Invoke-(Step|Check) ['\"]([^'\"]+)", text, re.MULTILINE)
    assert [s.split()[0] for _, s in steps] == ["SQL", "install", "the", "install", "install", "grant", "enable",
                                                "deploy"]
    # what it prints or throws never contains the credential or the connection string
    printed = [re.split(r"Write-\w+|throw ", line, maxsplit=1)[-1] for line in text.splitlines()
               if re.search(r"Write-(Host|Output|Verbose)|throw ", line)]
    assert printed and not any(re.search(r"\$Credential|Password|ConnectionString", line) for line in printed)


def functions() -> dict[str, tree_sitter.Node]:
    return {n.child_by_field_name("function_name").text.decode() if n.child_by_field_name("function_name")
            else n.children[1].text.decode(): n for n in nodes(parse(SCRIPT.read_bytes()), "function_statement")}


def enclosing_function(node: tree_sitter.Node) -> tree_sitter.Node | None:
    while node is not None and node.type != "function_statement":
        node = node.parent
    return node


def native_calls(source: bytes) -> list[tuple[str, str | None]]:
    """(text, enclosing function) of every call that runs a native program: `& <path or name>` unless the name
    is a [scriptblock] parameter of the enclosing function, and every bare command name that is not Verb-Noun
    (a cmdlet or one of the script's functions)."""
    found = []
    for command in nodes(parse(source), "command"):
        function = enclosing_function(command)
        name = function.children[1].text.decode() if function else None
        head = command.children[0]
        if head.type == "command_invokation_operator":
            target = command.children[1].text.decode()
            declared = function.children[2].text.decode() if function else ""
            if target.startswith("$") and re.search(rf"\[scriptblock\]{re.escape(target)}\b", declared):
                continue
            found.append((command.text.decode(), name))
        elif head.type == "command_name" and not re.fullmatch(r"[A-Za-z]+-[A-Za-z]+", head.text.decode()):
            found.append((command.text.decode(), name))
    return found


def test_every_native_command_runs_through_one_helper_that_owns_stderr_and_the_exit_code():
    """Defect 3 (issue 27): under $ErrorActionPreference = 'Stop', Windows PowerShell 5.1 and PowerShell 7.0-7.1
    turn a native command's stderr into a terminating error (PowerShell PR #13361, issue #14273), so the
    'is revoscalepy installed?' probe stopped the setup on a fresh runtime. Only Invoke-Native calls a native
    program; it runs it under 'Continue', reads stderr as text and judges by $LASTEXITCODE alone."""
    calls = native_calls(SCRIPT.read_bytes())
    assert [name for _, name in calls] == ["Invoke-Native"]
    helper = functions()["Invoke-Native"].text.decode()
    assert "$ErrorActionPreference = 'Continue'" in helper and "2>&1" in helper and "$code = $LASTEXITCODE" in helper
    assert helper.index("$ErrorActionPreference = 'Continue'") < helper.index("& $FilePath")
    assert "$PSNativeCommandUseErrorActionPreference = $false" in helper
    assert "Invoke-Native $Python @('-c', \"import $Module\") -AllowFailure" in SCRIPT.read_text()
    # the check bites: each of these forms is a native call outside the helper
    for line in (b"& $Python -c 'import x' 2>$null", b"icacls $PythonHome /T", b"& icacls.exe $x"):
        assert native_calls(line) == [(line.decode(), None)]


def test_sql_nulls_read_from_a_data_table_become_null_before_any_null_test():
    """Defect 1 (issue 27): a SQL NULL read from a DataTable is [DBNull]::Value, and `$null -eq [DBNull]::Value`
    is false (PowerShell PR #11584 reverted; issue #11604): `$null -eq (Get-Scalar ... TYPE_ID(N'vector'))` was
    never true, so 12_Vectors.sql ran on SQL Server 2022 and stopped the setup."""
    text = SCRIPT.read_text()
    scalar = functions()["Get-Scalar"].text.decode()
    convert = re.search(r"if \(\$value -is \[DBNull\]\) \{ return \$null \}", scalar)
    assert convert and scalar.index("$value = $table.Rows[0][0]") < convert.start() < scalar.rindex("return $value")
    assert all(t.startswith("Get-Scalar ") for t in re.findall(r"\$null -eq \(([^)]*)", text))
    assert not re.search(r"Rows\[\d\]\[[^\]]+\]\s*-eq\s*\$null|\$null\s*-eq\s*\$\w+\.Rows", text)


def test_register_rext_is_run_from_revoscalepys_folder():
    """Defect 4 (issue 27): Install SQL Server 2022 Machine Learning Services on Windows runs RegisterRext.exe from
    <PythonHome>\\Lib\\site-packages\\revoscalepy\\rxLibs, where revoscalepy's wheel installs it; the script
    looked only in <SQLPath>\\Binn and told a DBA with the feature installed to install it."""
    (register,) = [c for c in commands("Join-Path") if "RegisterRext" in c]
    assert register == "Join-Path $PythonHome 'Lib\\site-packages\\revoscalepy\\rxLibs\\RegisterRext.exe'"
    assert "Binn" not in SCRIPT.read_text()
    text = SCRIPT.read_text()
    assert text.index("install revoscalepy into the runtime") < text.index("$registerRext = ")


def test_no_double_quoted_string_ends_a_variable_name_with_a_colon():
    """PowerShell reads `"$name: ..."` as a drive-qualified variable and refuses to parse the script ("Variable
    reference is not valid. ':' was not followed by a valid variable name character"); ${name} delimits it."""
    strings = [n.text.decode() for n in nodes(parse(SCRIPT.read_bytes()), "expandable_string_literal")]
    assert strings and not [s for s in strings if re.search(r"\$(?!script:|env:)\w+:(?![\w{])", s)]
    assert re.search(r"\$(?!script:|env:)\w+:(?![\w{])", '"no $registerRext: install"')
