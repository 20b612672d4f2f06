<#
.SYNOPSIS
    Deploys image-similarity into SQL Server 2022 or 2025 with Machine Learning Services (Python), in one go.

.DESCRIPTION
    Run it elevated, on the machine that hosts the instance -Server names. In order, each step checked:
      1. Finds the instance (-Server host\INSTANCE, default MSSQLSERVER) in the registry and asks the server its
         version. SQL Server 2017 and 2019 stop here: their Machine Learning Services runtime is Python 3.5/3.7,
         which cannot host image-similarity (it needs Python 3.10+).
      2. SQL Server 2022/2025 ship no Python: checks the Python 3.10 runtime that Microsoft's 2022 guide has you
         install (-PythonHome, default C:\Program Files\Python310; -PythonInstaller installs it), installs
         revoscalepy from -RevoscalepyWheel when it is missing, grants the Launchpad service and
         ALL APPLICATION PACKAGES read access, and registers the runtime with the instance's RegisterRext.exe.
      3. Installs the image_similarity package (with torch) into that runtime with pip, as the guide installs
         packages into it; -WeightsFile copies backbone weights no package ships to where the sandbox reads them.
      4. Enables 'external scripts enabled', restarts the engine and Launchpad, and checks value_in_use.
      5. Runs 'image-similarity sqlserver deploy' with the runtime's Python: it checks that Python 3.10 and the
         package answer from sp_execute_external_script, runs SQLR\NN_*.sql in order (those marked
         '-- requires: vector' only where the VECTOR type exists) checking what each creates, loads every image
         under -ImageFolder with dbo.AddImage and runs dbo.Initial_Run_Once, printing each step.
    Safe to re-run: every step checks first and skips what is already there. Stops at the first error with a
    message naming the step. -WhatIf shows the changing steps without making them (the checks still run).

.EXAMPLE
    .\Setup-ImageSimilarity.ps1 -Server localhost -ImageFolder ..\Resources\fashion-texture -RevoscalepyWheel .\revoscalepy-10.0.1-py3-none-any.whl

.EXAMPLE
    .\Setup-ImageSimilarity.ps1 -Server sql01\ML -Database Images -Authentication Sql -Credential (Get-Credential) -WhatIf
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [Parameter(Mandatory = $true)][string]$Server,
    [ValidatePattern('^[A-Za-z_][A-Za-z0-9_]{0,127}$')][string]$Database = 'ImageSimilarity',
    [ValidateSet('Windows', 'Sql')][string]$Authentication = 'Windows',
    [System.Management.Automation.PSCredential]$Credential,
    [Parameter(Mandatory = $true)][ValidateScript({ Test-Path $_ -PathType Container })][string]$ImageFolder,
    [string]$PythonHome = 'C:\Program Files\Python310',
    [string]$PythonInstaller,
    [string]$RevoscalepyWheel,
    [string]$WeightsFile,
    [ValidateSet('efficientnet_lite0', 'mobilenet_v2', 'resnet18', 'resnet50', 'resnet101')]
    [string]$Backbone = 'efficientnet_lite0'
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$RepoRoot = Split-Path -Parent $PSScriptRoot
$SqlDir = Join-Path $RepoRoot 'SQLR'
# The versions resolved for win_amd64 / Python 3.10 with revoscalepy's numpy 1.22.0 (docs/sqlserver-setup.md).
$Constraints = Join-Path $PSScriptRoot 'constraints-sqlserver.txt'
$SqlServerKey = 'HKLM:\SOFTWARE\Microsoft\Microsoft SQL Server'

function Get-ConnectionString([string]$Catalog) {
    $builder = New-Object System.Data.SqlClient.SqlConnectionStringBuilder
    $builder['Data Source'] = $Server
    $builder['Initial Catalog'] = $Catalog
    if ($Authentication -eq 'Windows') {
        $builder['Integrated Security'] = $true
    } else {
        if (-not $Credential) { throw 'SQL authentication needs -Credential.' }
        $builder['User ID'] = $Credential.UserName
        $builder['Password'] = $Credential.GetNetworkCredential().Password
    }
    return $builder.ConnectionString
}

function Invoke-Batch([string]$Catalog, [string]$Sql, [hashtable]$Parameters = @{}) {
    $connection = New-Object System.Data.SqlClient.SqlConnection (Get-ConnectionString $Catalog)
    try {
        $connection.Open()
        $command = $connection.CreateCommand()
        $command.CommandText = $Sql
        $command.CommandTimeout = 0
        foreach ($name in $Parameters.Keys) { [void]$command.Parameters.AddWithValue("@$name", $Parameters[$name]) }
        $reader = $command.ExecuteReader()
        $table = New-Object System.Data.DataTable
        while (-not $reader.IsClosed) {
            # Load reads one result set and moves to the next; keep the last (a procedure's summary).
            $table = New-Object System.Data.DataTable
            $table.Load($reader)
        }
        return , $table
    } finally {
        $connection.Dispose()
    }
}

function Get-Scalar([string]$Catalog, [string]$Sql) {
    # A SQL NULL read from a DataTable is [DBNull]::Value, which PowerShell does not treat as $null
    # (PowerShell PR #11584, reverted; issue #11604): give callers $null for it.
    $table = Invoke-Batch $Catalog $Sql
    if ($table.Rows.Count -eq 0) { return $null }
    $value = $table.Rows[0][0]
    if ($value -is [DBNull]) { return $null }
    return $value
}

function Invoke-Step([string]$Name, [scriptblock]$Action) {
    if (-not $PSCmdlet.ShouldProcess("$Server/$Database", $Name)) { return }
    Write-Host "==> $Name"
    try { & $Action } catch { throw "Setup stopped at '$Name': $($_.Exception.Message)" }
}

function Invoke-Check([string]$Name, [scriptblock]$Action) {
    # Read-only steps: they run under -WhatIf too, so a dry run still finds what would stop a real one.
    Write-Host "--> check: $Name"
    try { & $Action } catch { throw "Setup stopped at check '$Name': $($_.Exception.Message)" }
}

function Get-InstanceName {
    # 'host\INSTANCE' names an instance; 'host' or 'host,port' the default one.
    $parts = ($Server -split ',')[0] -split '\\'
    if ($parts.Count -gt 1) { return $parts[1].ToUpperInvariant() }
    return 'MSSQLSERVER'
}

function Get-InstanceFolder([string]$Instance) {
    # Instance Names\SQL maps the instance to its id (MSSQL16.MSSQLSERVER); <id>\Setup\SQLPath is its
    # ...\MSSQL16.MSSQLSERVER\MSSQL folder.
    $ids = Get-ItemProperty -LiteralPath (Join-Path $SqlServerKey 'Instance Names\SQL') -ErrorAction SilentlyContinue
    if (-not $ids -or -not ($ids.PSObject.Properties.Name -contains $Instance)) {
        throw "no SQL Server instance '$Instance' on this machine; run the script on the server -Server names."
    }
    $id = $ids.$Instance
    $sqlPath = (Get-ItemProperty -LiteralPath (Join-Path $SqlServerKey "$id\Setup")).SQLPath
    return [pscustomobject]@{ Id = $id; SqlPath = $sqlPath; InstanceRoot = (Split-Path -Parent $sqlPath) }
}

function Get-ServiceNames([string]$Instance) {
    if ($Instance -eq 'MSSQLSERVER') { return @('MSSQLSERVER', 'MSSQLLaunchpad') }
    return @("MSSQL`$$Instance", "MSSQLLaunchpad`$$Instance")
}

function Invoke-Native([string]$FilePath, [string[]]$Arguments, [switch]$AllowFailure) {
    # The only place a native command runs. Windows PowerShell 5.1 and PowerShell 7.0-7.1 turn each line a
    # native command writes to stderr into an error record, which $ErrorActionPreference = 'Stop' makes a
    # terminating error (PowerShell PR #13361, issue #14273); 7.3+ can also stop on a non-zero exit code
    # ($PSNativeCommandUseErrorActionPreference). Here stderr is plain text and the exit code alone decides.
    $ErrorActionPreference = 'Continue'
    $PSNativeCommandUseErrorActionPreference = $false
    $output = @(& $FilePath @Arguments 2>&1 | ForEach-Object { "$_" })
    $code = $LASTEXITCODE
    if ($code -ne 0 -and -not $AllowFailure) {
        $last = if ($output.Count) { $output[-1] } else { 'no output' }
        throw "$(Split-Path -Leaf $FilePath) exited with code ${code}: $last"
    }
    return [pscustomobject]@{ ExitCode = $code; Output = $output }
}

function Get-PythonVersion([string]$Python) {
    $result = Invoke-Native $Python @('-c', "import sys; print('%d.%d' % sys.version_info[:2])")
    return [version]$result.Output[-1]
}

function Test-PythonImport([string]$Python, [string]$Module) {
    return (Invoke-Native $Python @('-c', "import $Module") -AllowFailure).ExitCode -eq 0
}

$identity = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $identity.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'Run this script from an elevated PowerShell (Run as administrator).'
}

$Instance = Get-InstanceName
$Services = Get-ServiceNames $Instance
$Python = Join-Path $PythonHome 'python.exe'

Invoke-Check "SQL Server version of instance $Instance" {
    $script:Folder = Get-InstanceFolder $Instance
    $script:MajorVersion = [int](Get-Scalar 'master' "SELECT CAST(SERVERPROPERTY('ProductMajorVersion') AS int);")
    if ($script:MajorVersion -in 14, 15) {
        $bundled = Join-Path $script:Folder.InstanceRoot 'PYTHON_SERVICES\python.exe'
        $found = if (Test-Path -LiteralPath $bundled) { " ($bundled is Python $(Get-PythonVersion $bundled))" } else { '' }
        throw ("SQL Server 2017/2019 is not supported: its Machine Learning Services runtime is Python 3.5/3.7$found, " +
            'which cannot host image-similarity (it needs Python 3.10 or later). Use SQL Server 2022 or 2025.')
    }
    if ($script:MajorVersion -lt 14) { throw 'SQL Server 2016 and older have no Python runtime; use SQL Server 2022 or 2025.' }
    Write-Host "    SQL Server major version $($script:MajorVersion) ($($script:Folder.Id))"
}

Invoke-Step "install Python 3.10 into $PythonHome" {
    if (Test-Path -LiteralPath $Python) { Write-Host '    already installed'; return }
    if (-not $PythonInstaller) {
        throw "no Python in ${PythonHome}: install Python 3.10 (64-bit, for all users) there, or pass -PythonInstaller."
    }
    $process = Start-Process -FilePath $PythonInstaller -Wait -PassThru -ArgumentList @(
        '/quiet', 'InstallAllUsers=1', 'PrependPath=0', 'Include_test=0', "TargetDir=`"$PythonHome`"")
    if ($process.ExitCode -ne 0) { throw "the Python installer failed (exit code $($process.ExitCode))." }
}

Invoke-Check 'the runtime is Python 3.10' {
    if (-not (Test-Path -LiteralPath $Python)) { throw "no $Python (run without -WhatIf to install it)." }
    $version = Get-PythonVersion $Python
    if ($version.Major -ne 3 -or $version.Minor -ne 10) {
        throw "$Python is Python $version; SQL Server 2022/2025 Machine Learning Services runs Python 3.10."
    }
}

Invoke-Step 'install revoscalepy into the runtime' {
    if (Test-PythonImport $Python 'revoscalepy') { Write-Host '    already installed'; return }
    if (-not $RevoscalepyWheel) {
        throw 'revoscalepy is missing: download the revoscalepy 10.0.1 wheel for Python 3.10 named in Microsoft''s SQL Server 2022 installation guide and pass -RevoscalepyWheel.'
    }
    [void](Invoke-Native $Python @('-m', 'pip', 'install', '--no-input', '-c', $Constraints, 'dill', 'numpy==1.22.0',
            'pandas', 'patsy', 'python-dateutil'))
    [void](Invoke-Native $Python @('-m', 'pip', 'install', '--no-input', $RevoscalepyWheel))
}

Invoke-Step 'install image_similarity into the runtime' {
    # -c keeps numpy at revoscalepy's 1.22.0 and every other package at the version resolved with it.
    [void](Invoke-Native $Python @('-m', 'pip', 'install', '--no-input', '-c', $Constraints, "$RepoRoot[mssql]"))
    if (-not (Test-PythonImport $Python 'image_similarity.contexts.inproc')) { throw 'image_similarity does not import.' }
    if ($WeightsFile) {
        $weights = Join-Path $PythonHome 'share\image-similarity\weights'
        New-Item -ItemType Directory -Force -Path $weights | Out-Null
        Copy-Item -LiteralPath $WeightsFile -Destination $weights -Force
    }
}

Invoke-Step 'grant the Launchpad sandbox read access and register the runtime' {
    foreach ($account in @("NT Service\$($Services[1])", '*S-1-15-2-1')) {
        [void](Invoke-Native 'icacls' @($PythonHome, '/grant', "${account}:(OI)(CI)RX", '/T', '/Q'))
    }
    # Install SQL Server 2022 Machine Learning Services on Windows: revoscalepy's wheel puts RegisterRext.exe in
    # <PythonHome>\Lib\site-packages\revoscalepy\rxLibs, and the page runs it from there.
    $registerRext = Join-Path $PythonHome 'Lib\site-packages\revoscalepy\rxLibs\RegisterRext.exe'
    if (-not (Test-Path -LiteralPath $registerRext)) {
        throw "no ${registerRext}: install revoscalepy into $PythonHome (-RevoscalepyWheel), which ships it."
    }
    [void](Invoke-Native $registerRext @('/configure', "/pythonhome:$PythonHome", "/instance:$Instance"))
}

Invoke-Step 'enable external scripts and restart the engine and Launchpad' {
    $inUse = [int](Get-Scalar 'master' "SELECT CAST(value_in_use AS int) FROM sys.configurations WHERE name = 'external scripts enabled';")
    if ($inUse -eq 1) { Write-Host '    already enabled'; return }
    [void](Invoke-Batch 'master' "EXEC sp_configure 'external scripts enabled', 1; RECONFIGURE WITH OVERRIDE;")
    Restart-Service -Name $Services[0] -Force
    Restart-Service -Name $Services[1] -Force
    $inUse = [int](Get-Scalar 'master' "SELECT CAST(value_in_use AS int) FROM sys.configurations WHERE name = 'external scripts enabled';")
    if ($inUse -ne 1) { throw "'external scripts enabled' is still not in use after the restart." }
}

Invoke-Step "deploy into $Database with image-similarity sqlserver deploy" {
    # Everything that talks to SQL Server is one Python command, run by the runtime's own Python (which has the
    # package): the checks, SQLR\ in order with what each script creates, the images, dbo.Initial_Run_Once, and
    # whether Python 3.10 and the package answer from sp_execute_external_script (docs/sqlserver-setup.md).
    $UserAt = if ($Authentication -eq 'Sql') { "$($Credential.UserName)@" } else { '' }
    if ($Authentication -eq 'Sql') { $env:IMAGE_SIMILARITY_DB_PASSWORD = $Credential.GetNetworkCredential().Password }
    $Images = (Resolve-Path -LiteralPath $ImageFolder).Path
    try {
        $deploy = Invoke-Native $Python @('-m', 'image_similarity.entrypoints.cli', 'sqlserver', 'deploy', '--db',
            "mssql://$UserAt$Server/$Database", '--images', "$Images", '--backbone', "$Backbone", '--sqlr', "$SqlDir")
        $deploy.Output | ForEach-Object { Write-Host "    $_" }
    } finally {
        Remove-Item -LiteralPath Env:IMAGE_SIMILARITY_DB_PASSWORD -ErrorAction SilentlyContinue
    }
}

Write-Host "Done: $Database on $Server. Rank a query with: EXEC dbo.RankCandidates @query = <varbinary(max)>;"
