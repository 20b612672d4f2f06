-- Creates the database when it does not exist yet (safe to re-run). Run in master with the sqlcmd variable
-- DatabaseName (PowerShell/Setup-ImageSimilarity.ps1 sets it); every later script runs in that database.
IF DB_ID(N'$(DatabaseName)') IS NULL
    CREATE DATABASE [$(DatabaseName)];
GO
