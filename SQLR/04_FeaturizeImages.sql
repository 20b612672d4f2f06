-- FeaturizeImages: feature vectors for every image that has none for the backbone, streamed in batches of
-- @batch_size images (a loop over id ranges); each batch is committed, so an interrupted run keeps what it
-- finished and a re-run goes on from there.
--
-- Conventions of every procedure in SQLR/ (new ones follow them):
-- * SET XACT_ABORT ON: any error stops the procedure and rolls its transaction back.
-- * Binary data crosses sp_execute_external_script only as hexadecimal text: CONVERT(varchar(max), x, 2) into
--   the input query or a varchar(max) parameter, CONVERT(varbinary(max), x, 2) on the way back in. Python sees
--   str, returns str; no varbinary column or parameter reaches the Python runtime.
-- * The script runs inside `with inproc.reported() as report:` and returns `report.error` through
--   @error nvarchar(4000) OUTPUT; the call sits in BEGIN TRY, whose CATCH keeps ERROR_MESSAGE() (Launchpad or
--   runtime failures). A non-NULL @error is THROWn as one line naming the procedure, before anything is written.
-- * Row counts are checked before anything destructive; writes happen in one short transaction.
CREATE OR ALTER PROCEDURE dbo.FeaturizeImages
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @batch_size int = 32
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @backbone IS NULL OR @backbone NOT IN (N'efficientnet_lite0', N'mobilenet_v2', N'resnet18', N'resnet50', N'resnet101')
        THROW 50011, N'FeaturizeImages: unknown backbone.', 1;
    IF @batch_size IS NULL OR @batch_size < 1 OR @batch_size > 1024
        THROW 50012, N'FeaturizeImages: batch size must be between 1 and 1024.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.images)
        THROW 50013, N'FeaturizeImages: no images stored; load images first.', 1;

    DECLARE @error nvarchar(4000), @last int = 0, @upto int, @expected int, @featurized int = 0;
    CREATE TABLE #batch (backbone nvarchar(64) NOT NULL, after_id int NOT NULL, upto_id int NOT NULL);
    CREATE TABLE #vectors (image_id int NOT NULL, dim int NULL, vector varchar(max) NULL, reason nvarchar(400) NULL);
    WHILE 1 = 1
    BEGIN
        SET @upto = NULL;
        SELECT @upto = MAX(b.id), @expected = COUNT(*) FROM (
            SELECT TOP (@batch_size) i.id FROM dbo.images AS i
            WHERE i.id > @last
                AND NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = i.id AND f.backbone = @backbone)
            ORDER BY i.id) AS b;
        IF @upto IS NULL
            BREAK;
        DELETE FROM #batch;
        INSERT INTO #batch (backbone, after_id, upto_id) VALUES (@backbone, @last, @upto);
        DELETE FROM #vectors;
        BEGIN TRY
            INSERT INTO #vectors (image_id, dim, vector, reason)
            EXEC sp_execute_external_script
                @language = N'Python',
                @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.featurize_images(InputDataSet, backbone)
error = report.error
',
                @input_data_1 = N'
SELECT i.id, CONVERT(varchar(max), i.data, 2) AS data
FROM dbo.images AS i JOIN #batch AS b ON i.id > b.after_id AND i.id <= b.upto_id
WHERE NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = i.id AND f.backbone = b.backbone)
ORDER BY i.id',
                @params = N'@backbone nvarchar(64), @error nvarchar(4000) OUTPUT',
                @backbone = @backbone,
                @error = @error OUTPUT;
        END TRY
        BEGIN CATCH
            SET @error = ERROR_MESSAGE();
        END CATCH;
        IF @error IS NOT NULL
        BEGIN
            SET @error = CONCAT(N'FeaturizeImages: ', @error, N' (images up to id ', @last, N' are kept)');
            THROW 50014, @error, 1;
        END;
        IF (SELECT COUNT(*) FROM #vectors) <> @expected
            OR EXISTS (SELECT 1 FROM #vectors WHERE (vector IS NULL AND reason IS NULL) OR LEN(vector) <> 8 * dim)
            THROW 50015, N'FeaturizeImages: the engine did not return one vector or one reason per image; nothing of this batch was stored.', 1;

        BEGIN TRANSACTION;
        INSERT INTO dbo.features (image_id, backbone, dim, vector)
        SELECT v.image_id, @backbone, v.dim, CONVERT(varbinary(max), v.vector, 2) FROM #vectors AS v
        WHERE v.vector IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = v.image_id AND f.backbone = @backbone);
        INSERT INTO dbo.rejected_files (name, label, stage, reason)
        SELECT CONCAT(N'image id ', v.image_id), N'', N'featurize', v.reason FROM #vectors AS v
        WHERE v.reason IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM dbo.rejected_files AS r
            WHERE r.name = CONCAT(N'image id ', v.image_id) AND r.stage = N'featurize' AND r.reason = v.reason);
        COMMIT TRANSACTION;
        SET @featurized = @featurized + (SELECT COUNT(*) FROM #vectors WHERE vector IS NOT NULL);
        SET @last = @upto;
    END;
    IF OBJECT_ID(N'dbo.StoreVectors', N'P') IS NOT NULL  -- SQL Server 2025: SQLR/12_Vectors.sql
        EXEC dbo.StoreVectors @backbone = @backbone;
    SELECT @featurized AS featurized, @backbone AS backbone;
END;
GO
