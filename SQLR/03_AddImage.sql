-- AddImage: validate one image's bytes with the engine and store them (the same checks as `ingest`).
-- A bad file is recorded in rejected_files; identical bytes already stored add nothing.
CREATE OR ALTER PROCEDURE dbo.AddImage
    @name nvarchar(400),
    @label nvarchar(200),
    @data varbinary(max),
    @image_id int = NULL OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    IF @name IS NULL OR LEN(@name) = 0 OR @label IS NULL OR LEN(@label) = 0
        THROW 50001, N'AddImage: name and label are required.', 1;
    IF @data IS NULL OR DATALENGTH(@data) = 0
        THROW 50002, N'AddImage: the image is empty.', 1;

    CREATE TABLE #info (
        format nvarchar(16) NULL, width int NULL, height int NULL, mode nvarchar(16) NULL,
        sha256 char(64) NULL, dhash char(64) NULL, reason nvarchar(400) NULL
    );
    INSERT INTO #info (format, width, height, mode, sha256, dhash, reason)
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from image_similarity import inproc
OutputDataSet = inproc.inspect(data)
',
        @params = N'@data varbinary(max)',
        @data = @data;

    BEGIN TRY
        BEGIN TRANSACTION;
        IF EXISTS (SELECT 1 FROM #info WHERE reason IS NOT NULL)
            MERGE dbo.rejected_files AS r
            USING (SELECT @name AS name, @label AS label, N'ingest' AS stage, reason FROM #info) AS s
                ON r.name = s.name AND r.stage = s.stage AND r.reason = s.reason
            WHEN MATCHED THEN UPDATE SET seen_at = SYSUTCDATETIME()
            WHEN NOT MATCHED THEN INSERT (name, label, stage, reason) VALUES (s.name, s.label, s.stage, s.reason);
        ELSE
            INSERT INTO dbo.images (name, label, format, width, height, mode, size_bytes, sha256, dhash, data)
            SELECT @name, @label, i.format, i.width, i.height, i.mode, DATALENGTH(@data), i.sha256, i.dhash, @data
            FROM #info AS i
            WHERE NOT EXISTS (SELECT 1 FROM dbo.images AS x WHERE x.sha256 = i.sha256);
        SET @image_id = (SELECT x.id FROM dbo.images AS x JOIN #info AS i ON x.sha256 = i.sha256);
        COMMIT TRANSACTION;
    END TRY
    BEGIN CATCH
        IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION;
        THROW;
    END CATCH;
END;
GO
