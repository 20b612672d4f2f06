-- ComputeNeighbors (issue 17): the top @top most similar catalogue images of every catalogue image (never an
-- image itself or its near duplicates), stored in dbo.neighbors; images already stored are skipped, so a repeated
-- call adds nothing. @method '' means the latest evaluation's best method (scores with a model and no
-- evaluation, cosine without a model); @refresh = 1 first removes this backbone's and method's rows.
-- Conventions: see SQLR/04_FeaturizeImages.sql. One image's list is one query:
--   SELECT n.rank, n.neighbor_id, i.name, n.score FROM dbo.neighbors AS n JOIN dbo.images AS i
--   ON i.id = n.neighbor_id WHERE n.image_id = 42 AND n.method = N'cosine' ORDER BY n.rank;
CREATE OR ALTER PROCEDURE dbo.ComputeNeighbors
    @backbone nvarchar(64) = NULL,
    @method nvarchar(16) = N'',
    @top int = 10,
    @model_version int = NULL,
    @refresh bit = 0
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @top IS NULL OR @top < 1 OR @top > 1000
        THROW 50111, N'ComputeNeighbors: top must be between 1 and 1000.', 1;
    IF @method IS NULL OR @method NOT IN (N'', N'l2', N'cosine', N'scores', N'learned')
        THROW 50112, N'ComputeNeighbors: method must be l2, cosine, scores or learned.', 1;
    SET @model_version = COALESCE(@model_version, (SELECT MAX(version) FROM dbo.models));
    DECLARE @model_backbone nvarchar(64), @classes nvarchar(max) = N'', @model_params nvarchar(max) = N'';
    SELECT @model_backbone = backbone, @classes = classes, @model_params = params
    FROM dbo.models WHERE version = @model_version;
    SET @backbone = COALESCE(@backbone, @model_backbone, N'efficientnet_lite0');
    IF @model_backbone IS NULL OR @model_backbone <> @backbone
        SET @model_version = NULL;
    IF @method = N''
        SET @method = CASE WHEN @model_version IS NULL THEN N'cosine' ELSE COALESCE((
            SELECT TOP (1) NULLIF(JSON_VALUE(summary, N'$.best_method'), N'') FROM dbo.evaluations
            WHERE model_version = @model_version ORDER BY id DESC), N'scores') END;
    IF @method IN (N'scores', N'learned') AND @model_version IS NULL
        THROW 50113, N'ComputeNeighbors: this method needs a model trained on the backbone; run TrainModel first.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.features WHERE backbone = @backbone)
        THROW 50114, N'ComputeNeighbors: empty catalogue; run FeaturizeImages first.', 1;
    DECLARE @stored_version int = CASE WHEN @method IN (N'scores', N'learned') THEN @model_version ELSE 0 END;
    IF @refresh IS NULL
        SET @refresh = 0;

    DECLARE @error nvarchar(4000);
    CREATE TABLE #step (backbone nvarchar(64) NOT NULL, method nvarchar(16) NOT NULL, model_version int NOT NULL,
                        refresh bit NOT NULL);
    INSERT INTO #step (backbone, method, model_version, refresh) VALUES (@backbone, @method, @stored_version, @refresh);
    CREATE TABLE #neighbors (image_id int NOT NULL, rank int NOT NULL, neighbor_id int NOT NULL, score float NOT NULL);
    BEGIN TRY
        INSERT INTO #neighbors (image_id, rank, neighbor_id, score)
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.compute_neighbors(InputDataSet, backbone, classes, model_params, model_version, method,
                                             top)
error = report.error
',
            @input_data_1 = N'
SELECT i.id AS image_id, i.name, i.label, i.sha256, i.dhash, CONVERT(varchar(max), f.vector, 2) AS data,
       CASE WHEN s.refresh = 0 AND EXISTS (SELECT 1 FROM dbo.neighbors AS n WHERE n.image_id = i.id
                         AND n.backbone = s.backbone AND n.method = s.method AND n.model_version = s.model_version)
            THEN 1 ELSE 0 END AS done,
       NULL AS array_name, NULL AS dtype, NULL AS shape
FROM dbo.images AS i
JOIN dbo.features AS f ON f.image_id = i.id
JOIN #step AS s ON f.backbone = s.backbone
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, CONVERT(varchar(max), a.data, 2), NULL, a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a
JOIN #step AS s ON a.version = s.model_version',
            @params = N'@backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
                        @model_version int, @method nvarchar(16), @top int, @error nvarchar(4000) OUTPUT',
            @backbone = @backbone,
            @classes = @classes,
            @model_params = @model_params,
            @model_version = @model_version,
            @method = @method,
            @top = @top,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'ComputeNeighbors: ', @error);
        THROW 50115, @error, 1;
    END;

    BEGIN TRY
        BEGIN TRANSACTION;
        IF @refresh = 1
            DELETE FROM dbo.neighbors
            WHERE backbone = @backbone AND method = @method AND model_version = @stored_version;
        INSERT INTO dbo.neighbors (image_id, backbone, method, model_version, rank, neighbor_id, score)
        SELECT n.image_id, @backbone, @method, @stored_version, n.rank, n.neighbor_id, n.score FROM #neighbors AS n
        WHERE NOT EXISTS (SELECT 1 FROM dbo.neighbors AS o
                          WHERE o.image_id = n.image_id AND o.backbone = @backbone AND o.method = @method
                            AND o.model_version = @stored_version AND o.rank = n.rank);
        COMMIT TRANSACTION;
    END TRY
    BEGIN CATCH
        IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION;
        THROW;
    END CATCH;
    SELECT COUNT(DISTINCT image_id) AS images, @method AS method, @backbone AS backbone FROM #neighbors;
END;
GO
