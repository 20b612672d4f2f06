-- RankCandidates: the catalogue images most similar to a query image (never the query or its near twins).
-- Stores the query and its results in queries/rankings and returns them as a result set.
CREATE OR ALTER PROCEDURE dbo.RankCandidates
    @query varbinary(max),
    @query_name nvarchar(400) = N'query',
    @top int = 10,
    @method nvarchar(16) = N'',
    @model_version int = NULL
AS
BEGIN
    SET NOCOUNT ON;
    IF @query IS NULL OR DATALENGTH(@query) = 0
        THROW 50051, N'RankCandidates: the query image is empty.', 1;
    IF @top IS NULL OR @top < 1 OR @top > 1000
        THROW 50052, N'RankCandidates: top must be between 1 and 1000.', 1;
    IF @method IS NULL OR @method NOT IN (N'', N'l2', N'cosine', N'scores', N'learned')
        THROW 50053, N'RankCandidates: method must be l2, cosine, scores or learned.', 1;
    SET @model_version = COALESCE(@model_version, (SELECT MAX(version) FROM dbo.models));
    IF @model_version IS NULL OR NOT EXISTS (SELECT 1 FROM dbo.models WHERE version = @model_version)
        THROW 50054, N'RankCandidates: no such trained model; run TrainModel first.', 1;

    DECLARE @backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max), @used_method nvarchar(16);
    DECLARE @best_method nvarchar(16) = COALESCE((
        SELECT TOP (1) JSON_VALUE(summary, N'$.best_method') FROM dbo.evaluations
        WHERE model_version = @model_version ORDER BY id DESC), N'');
    SELECT @backbone = backbone, @classes = classes, @model_params = params
    FROM dbo.models WHERE version = @model_version;
    IF NOT EXISTS (SELECT 1 FROM dbo.features WHERE backbone = @backbone)
        THROW 50055, N'RankCandidates: empty catalogue; run FeaturizeImages first.', 1;
    CREATE TABLE #step (backbone nvarchar(64) NOT NULL, model_version int NOT NULL);
    INSERT INTO #step (backbone, model_version) VALUES (@backbone, @model_version);
    CREATE TABLE #ranked (rank int NOT NULL, image_id int NOT NULL, name nvarchar(400) NOT NULL,
                          label nvarchar(200) NOT NULL, score float NOT NULL);
    INSERT INTO #ranked (rank, image_id, name, label, score)
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from image_similarity import inproc
OutputDataSet, used_method = inproc.rank_candidates(InputDataSet, query, backbone, classes, model_params,
                                                     model_version, top, method, best_method)
',
        @input_data_1 = N'
SELECT i.id AS image_id, i.name, i.label, i.sha256, i.dhash, f.vector AS data,
       NULL AS array_name, NULL AS dtype, NULL AS shape
FROM dbo.images AS i
JOIN dbo.features AS f ON f.image_id = i.id
JOIN #step AS s ON f.backbone = s.backbone
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, a.data, a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a
JOIN #step AS s ON a.version = s.model_version',
        @params = N'@query varbinary(max), @backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
                    @model_version int, @top int, @method nvarchar(16), @best_method nvarchar(16),
                    @used_method nvarchar(16) OUTPUT',
        @query = @query,
        @backbone = @backbone,
        @classes = @classes,
        @model_params = @model_params,
        @model_version = @model_version,
        @top = @top,
        @method = @method,
        @best_method = @best_method,
        @used_method = @used_method OUTPUT;

    BEGIN TRY
        BEGIN TRANSACTION;
        DECLARE @query_id int;
        INSERT INTO dbo.queries (query_name, query_sha256, method, backbone, model_version)
        VALUES (@query_name, LOWER(CONVERT(char(64), HASHBYTES('SHA2_256', @query), 2)), @used_method, @backbone,
                @model_version);
        SET @query_id = CAST(SCOPE_IDENTITY() AS int);
        INSERT INTO dbo.rankings (query_id, rank, image_id, score)
        SELECT @query_id, r.rank, r.image_id, r.score FROM #ranked AS r;
        COMMIT TRANSACTION;
    END TRY
    BEGIN CATCH
        IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION;
        THROW;
    END CATCH;
    SELECT r.rank, r.image_id, r.name, r.label, r.score FROM #ranked AS r ORDER BY r.rank;
END;
GO
