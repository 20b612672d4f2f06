<#
.SYNOPSIS
    Deploys image-similarity into SQL Server (2019+ with Machine Learning Services, Python) in one go.

.DESCRIPTION
    Checks it runs elevated; enables 'external scripts enabled'; pip-installs the image_similarity package
    (with torch) into SQL Server's Python; runs the SQLR\ scripts in their numbered order (creating the
    database and its objects); loads every image under -ImageFolder (one sub-folder per class) with
    dbo.AddImage; runs dbo.Initial_Run_Once and prints its summary. Safe to re-run: every step skips what
    is already there. Stops at the first error with a message naming the step. Supports -WhatIf.

.EXAMPLE
    .\Setup-ImageSimilarity.ps1 -Server localhost -ImageFolder ..\Resources\fashion-texture

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
    [string]$PythonPath,
    [ValidateSet('efficientnet_lite0', 'mobilenet_v2', 'resnet18', 'resnet50', 'resnet101')]
    [string]$Backbone = 'efficientnet_lite0'
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$RepoRoot = Split-Path -Parent $PSScriptRoot
$SqlDir = Join-Path $RepoRoot 'SQLR'

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

function Invoke-Step([string]$Name, [scriptblock]$Action) {
    if (-not $PSCmdlet.ShouldProcess("$Server/$Database", $Name)) { return }
    Write-Host "==> $Name"
    try { & $Action } catch { throw "Setup stopped at '$Name': $($_.Exception.Message)" }
}

function Invoke-SqlScript([System.IO.FileInfo]$File) {
    # The database script runs in master with the sqlcmd variable DatabaseName; the others in the database.
    $text = (Get-Content -Raw -LiteralPath $File.FullName).Replace('$(DatabaseName)', $Database)
    $catalog = if ($File.Name -like '01_*') { 'master' } else { $Database }
    foreach ($batch in [regex]::Split($text, '(?im)^\s*GO\s*$')) {
        if ($batch.Trim()) { [void](Invoke-Batch $catalog $batch) }
    }
}

function Find-SqlPython {
    if ($PythonPath) { return $PythonPath }
    $root = 'HKLM:\SOFTWARE\Microsoft\Microsoft SQL Server'
    foreach ($key in Get-ChildItem $root -ErrorAction SilentlyContinue) {
        $setup = Join-Path $key.PSPath 'Setup'
        $sqlPath = (Get-ItemProperty $setup -ErrorAction SilentlyContinue).SQLPath
        if ($sqlPath) {
            $python = Join-Path $sqlPath 'PYTHON_SERVICES\python.exe'
            if (Test-Path $python) { return $python }
        }
    }
    throw 'SQL Server''s Python (PYTHON_SERVICES\python.exe) was not found; pass -PythonPath.'
}

$identity = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $identity.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'Run this script from an elevated PowerShell (Run as administrator).'
}

Invoke-Step 'enable external scripts' {
    [void](Invoke-Batch 'master' "EXEC sp_configure 'external scripts enabled', 1; RECONFIGURE WITH OVERRIDE;")
}

Invoke-Step 'install image_similarity into SQL Server''s Python' {
    $python = Find-SqlPython
    & $python -m pip install --upgrade $RepoRoot
    if ($LASTEXITCODE -ne 0) { throw "pip install into $python failed (exit code $LASTEXITCODE)." }
}

foreach ($file in Get-ChildItem -LiteralPath $SqlDir -Filter '[0-9][0-9]_*.sql' | Sort-Object Name) {
    Invoke-Step "run SQLR\$($file.Name)" { Invoke-SqlScript $file }
}

Invoke-Step "load images from $ImageFolder" {
    $folder = (Resolve-Path $ImageFolder).Path
    foreach ($class in Get-ChildItem -LiteralPath $folder -Directory | Sort-Object Name) {
        foreach ($image in Get-ChildItem -LiteralPath $class.FullName -File -Recurse | Sort-Object FullName) {
            $name = $image.FullName.Substring($folder.Length + 1).Replace('\', '/')
            [void](Invoke-Batch $Database 'EXEC dbo.AddImage @name = @name, @label = @label, @data = @data;' @{
                    name = $name; label = $class.Name; data = [System.IO.File]::ReadAllBytes($image.FullName)
                })
        }
    }
}

Invoke-Step 'run dbo.Initial_Run_Once' {
    $summary = Invoke-Batch $Database 'EXEC dbo.Initial_Run_Once @backbone = @backbone;' @{ backbone = $Backbone }
    $summary | Format-Table -AutoSize | Out-String | Write-Host
}

Write-Host "Done: $Database on $Server. Rank a query with: EXEC dbo.RankCandidates @query = <varbinary(max)>;"
