-- issue 29: upgrades the tables of a database set up by an older release in place, before 02_Tables.sql (which
-- creates what is missing, dbo.schema_version included, and records the version of a new database) and the
-- procedures that read the new columns. Version 1 is every database made before dbo.schema_version existed: its
-- images table has no item_key. Each step runs in one transaction and records the versions it passed (1 and 2,
-- then 3), as the SQLite and PostgreSQL stores do. A new database (no dbo.images yet) records 3 and is left to
-- 02_Tables.sql. Safe to re-run. No name here comes from a user: the dynamic statements drop constraints SQL
-- Server named itself.
-- The rules followed, from Microsoft's ALTER TABLE (Transact-SQL) page
-- (learn.microsoft.com/sql/t-sql/statements/alter-table-transact-sql): ALTER COLUMN must repeat the column's type
-- when it gives NULL or NOT NULL; NULL may be given to any column not in a PRIMARY KEY; a column used in a UNIQUE
-- constraint cannot be altered, and a constraint is dropped by its name (here the UQ__images__... name the server
-- gave the old `sha256 ... UNIQUE`, read from sys.key_constraints); a column added to a table with rows must
-- allow NULL (or have a default). The new columns are indexed in a separate batch (sp_executesql), because the
-- batch that adds them was compiled before they existed.
SET XACT_ABORT ON;
GO
-- 02_Tables.sql's dbo.schema_version (tests/test_migrations.py checks the two definitions are the same), made
-- first so that the upgrade can record its steps
IF OBJECT_ID(N'dbo.schema_version', N'U') IS NULL
    CREATE TABLE dbo.schema_version (
        version int NOT NULL PRIMARY KEY,
        applied_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
    );
GO
IF OBJECT_ID(N'dbo.images', N'U') IS NOT NULL AND COL_LENGTH(N'dbo.images', N'item_key') IS NULL
BEGIN
    BEGIN TRANSACTION;
    -- version 2: label nullable, sha256 no longer unique (indexed), the item's key and metadata
    DECLARE @unique sysname = (
        SELECT kc.name FROM sys.key_constraints AS kc
        JOIN sys.index_columns AS ic ON ic.object_id = kc.parent_object_id AND ic.index_id = kc.unique_index_id
        WHERE kc.parent_object_id = OBJECT_ID(N'dbo.images') AND kc.type = 'UQ'
            AND COL_NAME(ic.object_id, ic.column_id) = N'sha256');
    IF @unique IS NOT NULL
    BEGIN
        DECLARE @drop nvarchar(400) = N'ALTER TABLE dbo.images DROP CONSTRAINT ' + QUOTENAME(@unique);
        EXEC sp_executesql @drop;
    END
    ALTER TABLE dbo.images ALTER COLUMN label nvarchar(200) NULL;
    ALTER TABLE dbo.images ADD item_key nvarchar(400) NULL, metadata nvarchar(max) NULL;
    EXEC sp_executesql N'CREATE INDEX ix_images_sha256 ON dbo.images (sha256);
        CREATE UNIQUE INDEX uq_images_item_key ON dbo.images (item_key) WHERE item_key IS NOT NULL;';
    INSERT INTO dbo.schema_version (version) VALUES (1), (2);
    COMMIT TRANSACTION;
END
GO
-- version 3 (issue 28): feature_runtimes.runtime may be 'openvino'. A database at version 2 has the table with a
-- CHECK that SQL Server named itself: it is found in sys.check_constraints, dropped and replaced by a named one.
-- (T-SQL does not promise to short-circuit AND: the test of the table's rows is nested, so that it runs, and is
-- resolved, only where the table exists.)
IF OBJECT_ID(N'dbo.schema_version', N'U') IS NOT NULL
BEGIN
    IF NOT EXISTS (SELECT 1 FROM dbo.schema_version WHERE version >= 3)
    BEGIN
        BEGIN TRANSACTION;
        DECLARE @check sysname = (
            SELECT cc.name FROM sys.check_constraints AS cc
            WHERE cc.parent_object_id = OBJECT_ID(N'dbo.feature_runtimes')
                AND COL_NAME(cc.parent_object_id, cc.parent_column_id) = N'runtime');
        IF @check IS NOT NULL
        BEGIN
            DECLARE @drop_check nvarchar(400) = N'ALTER TABLE dbo.feature_runtimes DROP CONSTRAINT ' + QUOTENAME(@check);
            EXEC sp_executesql @drop_check;
        END
        IF OBJECT_ID(N'dbo.feature_runtimes', N'U') IS NOT NULL
            ALTER TABLE dbo.feature_runtimes ADD CONSTRAINT ck_feature_runtimes_runtime
                CHECK (runtime IN (N'torch', N'onnxruntime', N'openvino'));
        INSERT INTO dbo.schema_version (version) VALUES (3);
        COMMIT TRANSACTION;
    END
END
GO
