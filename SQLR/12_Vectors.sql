-- requires: vector
-- SQL Server 2025 and later only (the VECTOR type): Setup-ImageSimilarity.ps1 runs this script only when
-- TYPE_ID(N'vector') is not NULL; older servers keep varbinary features and rank in Python.
-- Features are also stored as VECTOR(1998) (float32, the type's maximum): shorter ones are zero-padded (l2 and
-- cosine distances are unchanged), longer ones (ResNet-50/101: 2048 values) are not stored, so their backbones
-- rank in Python. So are each model version's catalogue rows of scores and learned (method_vectors: the engine's
-- search.methods.Method.matrix, zero-padded; inner products are unchanged), written by TrainModel and, for new
-- images, FeaturizeImages (through StoreVectors). RankCandidates ranks every method with VECTOR_DISTANCE through
-- dbo.RankByVector ('dot' for scores and learned) when the vectors it needs are all stored.
-- Conventions: see SQLR/04_FeaturizeImages.sql.
IF OBJECT_ID(N'dbo.feature_vectors', N'U') IS NULL
    CREATE TABLE dbo.feature_vectors (
        id int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        image_id int NOT NULL REFERENCES dbo.images (id) ON DELETE CASCADE,
        backbone nvarchar(64) NOT NULL,
        embedding VECTOR(1998) NOT NULL,
        CONSTRAINT uq_feature_vectors UNIQUE (image_id, backbone)
    );
GO
IF OBJECT_ID(N'dbo.method_vectors', N'U') IS NULL
    CREATE TABLE dbo.method_vectors (
        id int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        model_version int NOT NULL REFERENCES dbo.models (version) ON DELETE CASCADE,
        method nvarchar(16) NOT NULL CHECK (method IN (N'scores', N'learned')),
        image_id int NOT NULL REFERENCES dbo.images (id) ON DELETE CASCADE,
        embedding VECTOR(1998) NOT NULL,
        CONSTRAINT uq_method_vectors UNIQUE (model_version, method, image_id)
    );
GO
-- StoreVectors: VECTOR copies of the backbone's features that have none yet, in batches (each committed).
CREATE OR ALTER PROCEDURE dbo.StoreVectors
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @batch_size int = 1000
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @batch_size IS NULL OR @batch_size < 1
        THROW 50071, N'StoreVectors: batch size must be 1 or more.', 1;
    IF (SELECT MAX(dim) FROM dbo.features WHERE backbone = @backbone) > 1998
        RETURN;
    DECLARE @error nvarchar(4000), @last int = 0, @upto int, @expected int;
    CREATE TABLE #vector_batch (backbone nvarchar(64) NOT NULL, after_id int NOT NULL, upto_id int NOT NULL);
    CREATE TABLE #vector_rows (image_id int NOT NULL, embedding nvarchar(max) NULL);
    WHILE 1 = 1
    BEGIN
        SET @upto = NULL;
        SELECT @upto = MAX(b.image_id), @expected = COUNT(*) FROM (
            SELECT TOP (@batch_size) f.image_id FROM dbo.features AS f
            WHERE f.backbone = @backbone AND f.image_id > @last AND NOT EXISTS (
                SELECT 1 FROM dbo.feature_vectors AS v WHERE v.image_id = f.image_id AND v.backbone = f.backbone)
            ORDER BY f.image_id) AS b;
        IF @upto IS NULL
            BREAK;
        DELETE FROM #vector_batch;
        INSERT INTO #vector_batch (backbone, after_id, upto_id) VALUES (@backbone, @last, @upto);
        DELETE FROM #vector_rows;
        BEGIN TRY
            INSERT INTO #vector_rows (image_id, embedding)
            EXEC sp_execute_external_script
                @language = N'Python',
                @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.vector_json(InputDataSet)
error = report.error
',
                @input_data_1 = N'
SELECT f.image_id, CONVERT(varchar(max), f.vector, 2) AS vector
FROM dbo.features AS f JOIN #vector_batch AS b ON f.backbone = b.backbone
WHERE f.image_id > b.after_id AND f.image_id <= b.upto_id AND NOT EXISTS (
    SELECT 1 FROM dbo.feature_vectors AS v WHERE v.image_id = f.image_id AND v.backbone = f.backbone)
ORDER BY f.image_id',
                @params = N'@error nvarchar(4000) OUTPUT',
                @error = @error OUTPUT;
        END TRY
        BEGIN CATCH
            SET @error = ERROR_MESSAGE();
        END CATCH;
        IF @error IS NULL AND ((SELECT COUNT(*) FROM #vector_rows) <> @expected
                               OR EXISTS (SELECT 1 FROM #vector_rows WHERE embedding IS NULL))
            SET @error = N'the engine did not return one vector per feature';
        IF @error IS NOT NULL
        BEGIN
            SET @error = CONCAT(N'StoreVectors: ', @error);
            THROW 50072, @error, 1;
        END;
        BEGIN TRANSACTION;
        INSERT INTO dbo.feature_vectors (image_id, backbone, embedding)
        SELECT e.image_id, @backbone, CAST(e.embedding AS VECTOR(1998)) FROM #vector_rows AS e;
        COMMIT TRANSACTION;
        SET @last = @upto;
    END;
    EXEC dbo.StoreMethodVectors;
END;
GO
-- StoreMethodVectors: the rows of scores and learned under a model version (default: the latest) for its
-- backbone's featurized images that have none yet, in batches (each committed). Rows longer than VECTOR(1998)
-- (scores over ResNet-50 features) are not stored: RankCandidates then ranks that method in Python.
CREATE OR ALTER PROCEDURE dbo.StoreMethodVectors
    @model_version int = NULL,
    @batch_size int = 1000
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @batch_size IS NULL OR @batch_size < 1
        THROW 50077, N'StoreMethodVectors: batch size must be 1 or more.', 1;
    SET @model_version = COALESCE(@model_version, (SELECT MAX(version) FROM dbo.models));
    IF @model_version IS NULL
        RETURN;
    DECLARE @error nvarchar(4000), @backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
            @last int = 0, @upto int, @expected int;
    SELECT @backbone = backbone, @classes = classes, @model_params = params
    FROM dbo.models WHERE version = @model_version;
    CREATE TABLE #method_batch (backbone nvarchar(64) NOT NULL, model_version int NOT NULL, after_id int NOT NULL,
                                upto_id int NOT NULL);
    CREATE TABLE #method_rows (image_id int NOT NULL, method nvarchar(16) NULL, embedding nvarchar(max) NULL);
    WHILE 1 = 1
    BEGIN
        SET @upto = NULL;
        SELECT @upto = MAX(b.image_id), @expected = COUNT(*) FROM (
            SELECT TOP (@batch_size) f.image_id FROM dbo.features AS f
            WHERE f.backbone = @backbone AND f.image_id > @last AND (
                SELECT COUNT(*) FROM dbo.method_vectors AS v
                WHERE v.image_id = f.image_id AND v.model_version = @model_version) < 2
            ORDER BY f.image_id) AS b;
        IF @upto IS NULL
            BREAK;
        DELETE FROM #method_batch;
        INSERT INTO #method_batch (backbone, model_version, after_id, upto_id)
        VALUES (@backbone, @model_version, @last, @upto);
        DELETE FROM #method_rows;
        BEGIN TRY
            INSERT INTO #method_rows (image_id, method, embedding)
            EXEC sp_execute_external_script
                @language = N'Python',
                @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.method_vectors_json(InputDataSet, backbone, classes, model_params, model_version)
error = report.error
',
                @input_data_1 = N'
SELECT f.image_id, CONVERT(varchar(max), f.vector, 2) AS data, NULL AS array_name, NULL AS dtype, NULL AS shape
FROM dbo.features AS f JOIN #method_batch AS b ON f.backbone = b.backbone
WHERE f.image_id > b.after_id AND f.image_id <= b.upto_id
UNION ALL
SELECT NULL, CONVERT(varchar(max), a.data, 2), a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a JOIN #method_batch AS b ON a.version = b.model_version',
                @params = N'@backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
                            @model_version int, @error nvarchar(4000) OUTPUT',
                @backbone = @backbone,
                @classes = @classes,
                @model_params = @model_params,
                @model_version = @model_version,
                @error = @error OUTPUT;
        END TRY
        BEGIN CATCH
            SET @error = ERROR_MESSAGE();
        END CATCH;
        IF @error IS NULL AND (SELECT COUNT(*) FROM #method_rows) <> 2 * @expected
            SET @error = N'the engine did not return two rows per image';
        IF @error IS NOT NULL
        BEGIN
            SET @error = CONCAT(N'StoreMethodVectors: ', @error);
            THROW 50078, @error, 1;
        END;
        BEGIN TRANSACTION;
        INSERT INTO dbo.method_vectors (model_version, method, image_id, embedding)
        SELECT @model_version, r.method, r.image_id, CAST(r.embedding AS VECTOR(1998)) FROM #method_rows AS r
        WHERE r.embedding IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM dbo.method_vectors AS v
            WHERE v.model_version = @model_version AND v.method = r.method AND v.image_id = r.image_id);
        COMMIT TRANSACTION;
        SET @last = @upto;
    END;
END;
GO
-- RankByVector: fills the caller's #ranked (rank, image_id, score) with the @top best images by any method,
-- exactly (VECTOR_DISTANCE), as the engine scores them (l2: minus the distance; cosine: 1 - cosine distance;
-- scores, learned: the inner product of the method's query vector with the rows of @model_version), never the
-- query or its near twins. Leaves #ranked empty when some images have no vector for the method yet. @network: a
-- refined backbone's weights from dbo.ResolveBackbone (NULL for a pretrained one).
CREATE OR ALTER PROCEDURE dbo.RankByVector
    @query_hex varchar(max),
    @backbone nvarchar(64),
    @method nvarchar(16),
    @top int,
    @network nvarchar(max) = NULL,
    @model_version int = NULL
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @method IS NULL OR @method NOT IN (N'l2', N'cosine', N'scores', N'learned')
        THROW 50073, N'RankByVector: method must be l2, cosine, scores or learned.', 1;
    IF (CASE WHEN @method IN (N'l2', N'cosine')
             THEN (SELECT COUNT(*) FROM dbo.feature_vectors WHERE backbone = @backbone)
             ELSE (SELECT COUNT(*) FROM dbo.method_vectors WHERE model_version = @model_version AND method = @method)
        END) <> (SELECT COUNT(*) FROM dbo.features WHERE backbone = @backbone)
        RETURN;
    DECLARE @error nvarchar(4000), @query_vector nvarchar(max), @excluded nvarchar(max), @classes nvarchar(max),
            @model_params nvarchar(max);
    SELECT @classes = classes, @model_params = params FROM dbo.models WHERE version = @model_version;
    CREATE TABLE #vector_step (model_version int NULL);
    INSERT INTO #vector_step (model_version)
    VALUES (CASE WHEN @method IN (N'scores', N'learned') THEN @model_version END);
    BEGIN TRY
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
# output variables are set on every path (Known issues for Python and R)
query_vector = excluded = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    query_vector, excluded = inproc.vector_query(InputDataSet, query_hex, backbone, network, method, classes,
                                                 model_params, model_version)
error = report.error
',
            @input_data_1 = N'
SELECT i.id AS image_id, i.sha256, i.dhash, NULL AS data, NULL AS array_name, NULL AS dtype, NULL AS shape
FROM dbo.images AS i
UNION ALL
SELECT NULL, NULL, NULL, CONVERT(varchar(max), a.data, 2), a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a JOIN #vector_step AS s ON a.version = s.model_version',
            @params = N'@query_hex varchar(max), @backbone nvarchar(64), @network nvarchar(max),
                        @method nvarchar(16), @classes nvarchar(max), @model_params nvarchar(max),
                        @model_version int, @query_vector nvarchar(max) OUTPUT,
                        @excluded nvarchar(max) OUTPUT, @error nvarchar(4000) OUTPUT',
            @query_hex = @query_hex,
            @backbone = @backbone,
            @network = @network,
            @method = @method,
            @classes = @classes,
            @model_params = @model_params,
            @model_version = @model_version,
            @query_vector = @query_vector OUTPUT,
            @excluded = @excluded OUTPUT,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NULL AND (ISJSON(@query_vector) IS NULL OR ISJSON(@query_vector) = 0
                           OR ISJSON(@excluded) IS NULL OR ISJSON(@excluded) = 0)
        SET @error = N'the engine returned no query vector';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'RankByVector: ', @error);
        THROW 50074, @error, 1;
    END;
    DECLARE @q VECTOR(1998) = CAST(@query_vector AS VECTOR(1998));
    INSERT INTO #ranked (rank, image_id, score)
    SELECT TOP (@top) ROW_NUMBER() OVER (ORDER BY d.score DESC, d.image_id), d.image_id, d.score
    FROM (SELECT v.image_id,
                 CASE WHEN @method = N'l2' THEN -VECTOR_DISTANCE('euclidean', v.embedding, @q)
                      WHEN @method = N'cosine' THEN 1 - VECTOR_DISTANCE('cosine', v.embedding, @q)
                      ELSE -VECTOR_DISTANCE('dot', v.embedding, @q) END AS score
          FROM (SELECT f.image_id, f.embedding FROM dbo.feature_vectors AS f
                WHERE f.backbone = @backbone AND @method IN (N'l2', N'cosine')
                UNION ALL
                SELECT m.image_id, m.embedding FROM dbo.method_vectors AS m
                WHERE m.model_version = @model_version AND m.method = @method) AS v
          WHERE NOT EXISTS (
              SELECT 1 FROM OPENJSON(@excluded) WITH (image_id int '$') AS x WHERE x.image_id = v.image_id)) AS d
    ORDER BY d.score DESC, d.image_id;
END;
GO
-- SuggestRanked (issue 29): the latest model's suggested label and its probability for the unlabelled images in
-- the caller's #ranked (RankByVector's matches), computed by the engine from their stored features as the Python
-- path computes them for its matches (pipeline/suggest.py): one Python call that reads the ranked rows' features
-- only, none when no match is unlabelled. Labelled matches keep NULL.
CREATE OR ALTER PROCEDURE dbo.SuggestRanked
    @backbone nvarchar(64),
    @classes nvarchar(max),
    @model_params nvarchar(max),
    @model_version int
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    CREATE TABLE #suggest_step (image_id int NOT NULL PRIMARY KEY, backbone nvarchar(64) NOT NULL,
                                model_version int NOT NULL);
    INSERT INTO #suggest_step (image_id, backbone, model_version)
    SELECT r.image_id, @backbone, @model_version FROM #ranked AS r JOIN dbo.images AS i ON i.id = r.image_id
    WHERE i.label IS NULL;
    IF NOT EXISTS (SELECT 1 FROM #suggest_step)
        RETURN;
    DECLARE @error nvarchar(4000), @suggested nvarchar(max);
    BEGIN TRY
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
# output variables are set on every path (Known issues for Python and R)
suggested = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    suggested = inproc.suggest_rows(InputDataSet, backbone, classes, model_params, model_version)
error = report.error
',
            @input_data_1 = N'
SELECT i.id AS image_id, i.name, i.label, i.sha256, i.dhash, CONVERT(varchar(max), f.vector, 2) AS data,
       NULL AS array_name, NULL AS dtype, NULL AS shape
FROM #suggest_step AS s
JOIN dbo.images AS i ON i.id = s.image_id
JOIN dbo.features AS f ON f.image_id = s.image_id AND f.backbone = s.backbone
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, CONVERT(varchar(max), a.data, 2), a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a
WHERE a.version IN (SELECT model_version FROM #suggest_step)',
            @params = N'@backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
                        @model_version int, @suggested nvarchar(max) OUTPUT, @error nvarchar(4000) OUTPUT',
            @backbone = @backbone,
            @classes = @classes,
            @model_params = @model_params,
            @model_version = @model_version,
            @suggested = @suggested OUTPUT,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NULL AND (ISJSON(@suggested) IS NULL OR ISJSON(@suggested) = 0)
        SET @error = N'the engine returned no suggestions';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'SuggestRanked: ', @error);
        THROW 50079, @error, 1;
    END;
    UPDATE #ranked
    SET suggested = (SELECT j.suggested FROM OPENJSON(@suggested) WITH (image_id int '$.image_id',
                                                                        suggested nvarchar(200) '$.suggested') AS j
                     WHERE j.image_id = #ranked.image_id),
        probability = (SELECT j.probability FROM OPENJSON(@suggested) WITH (image_id int '$.image_id',
                                                                            probability float '$.probability') AS j
                       WHERE j.image_id = #ranked.image_id);
END;
GO
-- CreateVectorIndex: an approximate DiskANN index on the vectors, for the operator to create once the
-- catalogue is loaded (a preview feature of SQL Server 2025: the database needs PREVIEW_FEATURES = ON). The
-- exact ranking above does not use it (VECTOR_DISTANCE never does); VECTOR_SEARCH queries can.
-- On SQL Server 2025 such an index makes its table read-only (CREATE VECTOR INDEX, "Earlier vector index version
-- limitations"), so FeaturizeImages (StoreVectors) and deleting an image would fail afterwards: the procedure
-- needs ALLOW_STALE_VECTOR_INDEX = ON, which lets writes go on (VECTOR_SEARCH may then miss new rows; the exact
-- ranking never does), and the 100 vectors the index needs at least.
CREATE OR ALTER PROCEDURE dbo.CreateVectorIndex
    @metric nvarchar(16) = N'cosine'
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @metric IS NULL OR @metric NOT IN (N'cosine', N'euclidean')
        THROW 50075, N'CreateVectorIndex: metric must be cosine or euclidean.', 1;
    IF NOT EXISTS (SELECT 1 FROM sys.database_scoped_configurations
                   WHERE name = N'PREVIEW_FEATURES' AND CAST(value AS int) = 1)
        THROW 50076, N'CreateVectorIndex: DiskANN indexes are a preview feature; run ALTER DATABASE SCOPED CONFIGURATION SET PREVIEW_FEATURES = ON first.', 1;
    IF NOT EXISTS (SELECT 1 FROM sys.database_scoped_configurations
                   WHERE name = N'ALLOW_STALE_VECTOR_INDEX' AND CAST(value AS int) = 1)
        THROW 50077, N'CreateVectorIndex: on SQL Server 2025 a vector index makes its table read-only, so featurizing and deleting images would fail; run ALTER DATABASE SCOPED CONFIGURATION SET ALLOW_STALE_VECTOR_INDEX = ON first.', 1;
    IF EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'ix_feature_vectors_embedding')
        RETURN;
    IF (SELECT COUNT(*) FROM dbo.feature_vectors) < 100
        THROW 50078, N'CreateVectorIndex: a vector index needs at least 100 stored vectors; featurize more images first.', 1;
    IF @metric = N'cosine'
        CREATE VECTOR INDEX ix_feature_vectors_embedding ON dbo.feature_vectors (embedding)
        WITH (METRIC = 'cosine', TYPE = 'DiskANN');
    ELSE
        CREATE VECTOR INDEX ix_feature_vectors_embedding ON dbo.feature_vectors (embedding)
        WITH (METRIC = 'euclidean', TYPE = 'DiskANN');
END;
GO
