-- FeaturizeImages: feature vectors for every image that has none for the backbone (resumable).
CREATE OR ALTER PROCEDURE dbo.FeaturizeImages
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @batch_size int = 32
AS
BEGIN
    SET NOCOUNT ON;
    IF @backbone NOT IN (N'efficientnet_lite0', N'mobilenet_v2', N'resnet18', N'resnet50', N'resnet101')
        THROW 50011, N'FeaturizeImages: unknown backbone.', 1;
    IF @batch_size IS NULL OR @batch_size < 1 OR @batch_size > 1024
        THROW 50012, N'FeaturizeImages: batch size must be between 1 and 1024.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.images)
        THROW 50013, N'FeaturizeImages: no images stored; load images first.', 1;

    CREATE TABLE #step (backbone nvarchar(64) NOT NULL);
    INSERT INTO #step (backbone) VALUES (@backbone);
    CREATE TABLE #vectors (image_id int NOT NULL, dim int NULL, vector varbinary(max) NULL, reason nvarchar(400) NULL);
    INSERT INTO #vectors (image_id, dim, vector, reason)
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from image_similarity import inproc
OutputDataSet = inproc.featurize_images(InputDataSet, backbone, batch_size)
',
        @input_data_1 = N'
SELECT i.id, i.data FROM dbo.images AS i
WHERE NOT EXISTS (SELECT 1 FROM dbo.features AS f JOIN #step AS s ON f.backbone = s.backbone
                  WHERE f.image_id = i.id)
ORDER BY i.id',
        @params = N'@backbone nvarchar(64), @batch_size int',
        @backbone = @backbone,
        @batch_size = @batch_size;

    BEGIN TRY
        BEGIN TRANSACTION;
        INSERT INTO dbo.features (image_id, backbone, dim, vector)
        SELECT v.image_id, @backbone, v.dim, v.vector FROM #vectors AS v
        WHERE v.vector IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = v.image_id AND f.backbone = @backbone);
        INSERT INTO dbo.rejected_files (name, label, stage, reason)
        SELECT CONCAT(N'image id ', v.image_id), N'', N'featurize', v.reason FROM #vectors AS v
        WHERE v.reason IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM dbo.rejected_files AS r
            WHERE r.name = CONCAT(N'image id ', v.image_id) AND r.stage = N'featurize' AND r.reason = v.reason);
        COMMIT TRANSACTION;
    END TRY
    BEGIN CATCH
        IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION;
        THROW;
    END CATCH;
    SELECT COUNT(*) AS featurized, @backbone AS backbone FROM #vectors WHERE vector IS NOT NULL;
END;
GO
