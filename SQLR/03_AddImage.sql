-- AddImage: validate one image's bytes with the engine and store them (the same checks as `ingest`).
-- A bad file is recorded in rejected_files; identical bytes already stored add nothing. Issue 29: @label NULL
-- stores an unlabelled item; @item_key (unique) and @metadata (a JSON object) describe the item: a key stored
-- with the same bytes adds nothing, with other bytes its row is replaced (its features, split row, neighbours
-- and rankings go with it) in the same transaction. Conventions: see SQLR/04_FeaturizeImages.sql.
CREATE OR ALTER PROCEDURE dbo.AddImage
    @name nvarchar(400),
    @label nvarchar(200) = NULL,
    @data varbinary(max),
    @image_id int = NULL OUTPUT,
    @item_key nvarchar(400) = NULL,
    @metadata nvarchar(max) = NULL
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @name IS NULL OR LEN(@name) = 0
        THROW 50001, N'AddImage: a name is required.', 1;
    IF @label IS NOT NULL AND LEN(@label) = 0
        SET @label = NULL;
    IF @metadata IS NOT NULL AND (ISJSON(@metadata) IS NULL OR ISJSON(@metadata) = 0 OR SUBSTRING(LTRIM(@metadata), 1, 1) <> N'{')
        THROW 50004, N'AddImage: metadata must be a JSON object.', 1;
    IF @data IS NULL OR DATALENGTH(@data) = 0
        THROW 50002, N'AddImage: the image is empty.', 1;

    DECLARE @error nvarchar(4000), @data_hex varchar(max) = CONVERT(varchar(max), @data, 2);
    CREATE TABLE #info (
        format nvarchar(16) NULL, width int NULL, height int NULL, mode nvarchar(16) NULL,
        sha256 char(64) NULL, dhash char(64) NULL, reason nvarchar(400) NULL
    );
    BEGIN TRY
        INSERT INTO #info (format, width, height, mode, sha256, dhash, reason)
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.inspect(data_hex)
error = report.error
',
            @params = N'@data_hex varchar(max), @error nvarchar(4000) OUTPUT',
            @data_hex = @data_hex,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    -- the engine sends '' and 0 for what is absent (no NULL or NaN in OutputDataSet: their mapping is undocumented)
    UPDATE #info SET format = NULLIF(format, N''), width = NULLIF(width, 0), height = NULLIF(height, 0),
        mode = NULLIF(mode, N''), sha256 = NULLIF(sha256, ''), dhash = NULLIF(dhash, ''), reason = NULLIF(reason, N'');
    IF @error IS NULL AND (SELECT COUNT(*) FROM #info WHERE sha256 IS NOT NULL OR reason IS NOT NULL) <> 1
        SET @error = N'the engine did not return one result for the image';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'AddImage: ', @error);
        THROW 50003, @error, 1;
    END;

    BEGIN TRANSACTION;
    UPDATE dbo.rejected_files SET seen_at = SYSUTCDATETIME()
    WHERE name = @name AND stage = N'ingest' AND reason IN (SELECT reason FROM #info);
    INSERT INTO dbo.rejected_files (name, label, stage, reason)
    SELECT @name, COALESCE(@label, N''), N'ingest', i.reason FROM #info AS i
    WHERE i.reason IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM dbo.rejected_files AS r WHERE r.name = @name AND r.stage = N'ingest' AND r.reason = i.reason);
    DECLARE @old int = (SELECT x.id FROM dbo.images AS x WITH (UPDLOCK, HOLDLOCK) JOIN #info AS i
                        ON x.item_key = @item_key AND x.sha256 <> i.sha256 WHERE i.reason IS NULL);
    IF @old IS NOT NULL  -- the key's new image: the old row goes with what names it
    BEGIN
        DELETE FROM dbo.rankings WHERE image_id = @old;
        DELETE FROM dbo.neighbors WHERE neighbor_id = @old;
        DELETE FROM dbo.images WHERE id = @old;
    END;
    INSERT INTO dbo.images (name, label, format, width, height, mode, size_bytes, sha256, dhash, data, item_key, metadata)
    SELECT @name, @label, i.format, i.width, i.height, i.mode, DATALENGTH(@data), i.sha256, i.dhash, @data, @item_key,
           @metadata
    FROM #info AS i
    WHERE i.reason IS NULL AND NOT EXISTS (SELECT 1 FROM dbo.images AS x WITH (UPDLOCK, HOLDLOCK)
                                           WHERE (@item_key IS NULL AND x.sha256 = i.sha256) OR x.item_key = @item_key);
    SET @image_id = (SELECT TOP (1) x.id FROM dbo.images AS x JOIN #info AS i ON x.sha256 = i.sha256
                     WHERE @item_key IS NULL OR x.item_key = @item_key ORDER BY x.id);
    COMMIT TRANSACTION;
END;
GO
