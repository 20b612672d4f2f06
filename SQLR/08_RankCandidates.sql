-- RankCandidates: the catalogue images most similar to a query image (never the query or its near twins).
-- Stores the query and its results in queries/rankings and returns them as one result set. It uses no
-- INSERT ... EXEC itself (results come back through an OUTPUT parameter), so a caller may
-- INSERT ... EXEC dbo.RankCandidates. On SQL Server 2025 (SQLR/12_Vectors.sql) every method ranks in T-SQL
-- with VECTOR_DISTANCE when its vectors are stored, and dbo.SuggestRanked adds the suggestions for its unlabelled
-- matches. The model's backbone may be a refined network: its weights cross as @network (see
-- ResolveBackbone in SQLR/04_FeaturizeImages.sql). Conventions: see SQLR/04_FeaturizeImages.sql.
CREATE OR ALTER PROCEDURE dbo.RankCandidates
    @query varbinary(max),
    @query_name nvarchar(400) = N'query',
    @top int = 10,
    @method nvarchar(16) = N'',
    @model_version int = NULL
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @query IS NULL OR DATALENGTH(@query) = 0
        THROW 50051, N'RankCandidates: the query image is empty.', 1;
    IF @top IS NULL OR @top < 1 OR @top > 1000
        THROW 50052, N'RankCandidates: top must be between 1 and 1000.', 1;
    IF @method IS NULL OR @method NOT IN (N'', N'l2', N'cosine', N'scores', N'learned')
        THROW 50053, N'RankCandidates: method must be l2, cosine, scores or learned.', 1;
    SET @model_version = COALESCE(@model_version, (SELECT MAX(version) FROM dbo.models));
    IF @model_version IS NULL OR NOT EXISTS (SELECT 1 FROM dbo.models WHERE version = @model_version)
        THROW 50054, N'RankCandidates: no such trained model; run TrainModel first.', 1;

    DECLARE @error nvarchar(4000), @backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
            @used_method nvarchar(16), @ranked nvarchar(max), @network nvarchar(max),
            @query_hex varchar(max) = CONVERT(varchar(max), @query, 2);
    DECLARE @summary nvarchar(max) = (
        SELECT TOP (1) summary FROM dbo.evaluations WHERE model_version = @model_version ORDER BY id DESC);
    DECLARE @best_method nvarchar(16) = CASE WHEN ISJSON(@summary) = 1 THEN JSON_VALUE(@summary, N'$.best_method') END;
    SET @used_method = CASE WHEN @method <> N'' THEN @method
                            WHEN @best_method IN (N'l2', N'cosine', N'scores', N'learned') THEN @best_method
                            ELSE N'scores' END;  -- rank.default_method: scores for a model not evaluated yet
    SELECT @backbone = backbone, @classes = classes, @model_params = params
    FROM dbo.models WHERE version = @model_version;
    IF NOT EXISTS (SELECT 1 FROM dbo.features WHERE backbone = @backbone)
        THROW 50055, N'RankCandidates: empty catalogue; run FeaturizeImages first.', 1;
    EXEC dbo.ResolveBackbone @backbone = @backbone, @caller = N'RankCandidates', @network = @network OUTPUT;
    CREATE TABLE #ranked (rank int NOT NULL, image_id int NOT NULL, score float NOT NULL, suggested nvarchar(200) NULL,
                          probability float NULL);

    IF OBJECT_ID(N'dbo.RankByVector', N'P') IS NOT NULL
    BEGIN
        EXEC dbo.RankByVector @query_hex = @query_hex, @backbone = @backbone, @method = @used_method, @top = @top,
                              @network = @network, @model_version = @model_version;
        EXEC dbo.SuggestRanked @backbone = @backbone, @classes = @classes, @model_params = @model_params,
                               @model_version = @model_version;
    END
    IF NOT EXISTS (SELECT 1 FROM #ranked)
    BEGIN
        CREATE TABLE #step (backbone nvarchar(64) NOT NULL, model_version int NOT NULL);
        INSERT INTO #step (backbone, model_version) VALUES (@backbone, @model_version);
        BEGIN TRY
            EXEC sp_execute_external_script
                @language = N'Python',
                @script = N'
# output variables are set on every path (Known issues for Python and R)
ranked = used_method = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    ranked, used_method = inproc.rank_candidates(InputDataSet, query_hex, backbone, classes, model_params,
                                                 model_version, top, method, network)
error = report.error
',
                @input_data_1 = N'
SELECT i.id AS image_id, i.name, i.label, i.sha256, i.dhash, CONVERT(varchar(max), f.vector, 2) AS data,
       NULL AS array_name, NULL AS dtype, NULL AS shape
FROM dbo.images AS i
JOIN dbo.features AS f ON f.image_id = i.id
JOIN #step AS s ON f.backbone = s.backbone
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, CONVERT(varchar(max), a.data, 2), a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a
JOIN #step AS s ON a.version = s.model_version',
                @params = N'@query_hex varchar(max), @backbone nvarchar(64), @classes nvarchar(max),
                            @model_params nvarchar(max), @model_version int, @top int, @method nvarchar(16),
                            @network nvarchar(max),
                            @used_method nvarchar(16) OUTPUT, @ranked nvarchar(max) OUTPUT,
                            @error nvarchar(4000) OUTPUT',
                @query_hex = @query_hex,
                @backbone = @backbone,
                @classes = @classes,
                @model_params = @model_params,
                @model_version = @model_version,
                @top = @top,
                @method = @used_method,
                @network = @network,
                @used_method = @used_method OUTPUT,
                @ranked = @ranked OUTPUT,
                @error = @error OUTPUT;
        END TRY
        BEGIN CATCH
            SET @error = ERROR_MESSAGE();
        END CATCH;
        IF @error IS NULL AND (ISJSON(@ranked) IS NULL OR ISJSON(@ranked) = 0)
            SET @error = N'the engine returned no ranking';
        IF @error IS NOT NULL
        BEGIN
            SET @error = CONCAT(N'RankCandidates: ', @error);
            THROW 50056, @error, 1;
        END;
        INSERT INTO #ranked (rank, image_id, score, suggested, probability)
        SELECT j.rank, j.image_id, j.score, j.suggested, j.probability
        FROM OPENJSON(@ranked) WITH (rank int '$.rank', image_id int '$.image_id', score float '$.score',
                                     suggested nvarchar(200) '$.suggested', probability float '$.probability') AS j;
    END;
    IF (SELECT COUNT(*) FROM #ranked) > @top
        THROW 50057, N'RankCandidates: the engine returned more rows than asked for; nothing was stored.', 1;

    DECLARE @query_id int;
    BEGIN TRANSACTION;
    INSERT INTO dbo.queries (query_name, query_sha256, method, backbone, model_version)
    VALUES (@query_name, LOWER(CONVERT(char(64), HASHBYTES('SHA2_256', @query), 2)), @used_method, @backbone,
            @model_version);
    SET @query_id = CAST(SCOPE_IDENTITY() AS int);
    INSERT INTO dbo.rankings (query_id, rank, image_id, score)
    SELECT @query_id, r.rank, r.image_id, r.score FROM #ranked AS r;
    COMMIT TRANSACTION;
    -- issue 29: label NULL for an unlabelled image; the item's key and metadata (JSON text) as ingested; for an
    -- unlabelled image the model's suggested label and its probability (on the VECTOR path computed for the
    -- ranked rows only, by dbo.SuggestRanked)
    SELECT r.rank, r.image_id, i.name, i.label, r.score, i.item_key, i.metadata, r.suggested, r.probability
    FROM #ranked AS r JOIN dbo.images AS i ON i.id = r.image_id ORDER BY r.rank;
END;
GO
