-- requires: vector
-- SQL Server 2025 and later only (the VECTOR type): Setup-ImageSimilarity.ps1 runs this script only when
-- TYPE_ID(N'vector') is not NULL; older servers keep varbinary features and rank in Python.
-- Features are also stored as VECTOR(1998) (float32, the type's maximum): shorter ones are zero-padded (l2 and
-- cosine distances are unchanged), longer ones (ResNet-50/101: 2048 values) are not stored, so their backbones
-- rank in Python. RankCandidates ranks l2 and cosine with VECTOR_DISTANCE through dbo.RankByVector.
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
END;
GO
-- RankByVector: fills the caller's #ranked (rank, image_id, score) with the @top nearest images by l2 or cosine,
-- exactly (VECTOR_DISTANCE), as the engine scores them (l2: minus the distance; cosine: 1 - cosine distance),
-- never the query or its near twins. Leaves #ranked empty when some features have no vector yet. @network: a
-- refined backbone's weights from dbo.ResolveBackbone (NULL for a pretrained one).
CREATE OR ALTER PROCEDURE dbo.RankByVector
    @query_hex varchar(max),
    @backbone nvarchar(64),
    @method nvarchar(16),
    @top int,
    @network nvarchar(max) = NULL
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @method IS NULL OR @method NOT IN (N'l2', N'cosine')
        THROW 50073, N'RankByVector: method must be l2 or cosine.', 1;
    IF (SELECT COUNT(*) FROM dbo.feature_vectors WHERE backbone = @backbone)
        <> (SELECT COUNT(*) FROM dbo.features WHERE backbone = @backbone)
        RETURN;
    DECLARE @error nvarchar(4000), @query_vector nvarchar(max), @excluded nvarchar(max);
    BEGIN TRY
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
# output variables are set on every path (Known issues for Python and R)
query_vector = excluded = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    query_vector, excluded = inproc.vector_query(InputDataSet, query_hex, backbone, network)
error = report.error
',
            @input_data_1 = N'SELECT i.id AS image_id, i.sha256, i.dhash FROM dbo.images AS i ORDER BY i.id',
            @params = N'@query_hex varchar(max), @backbone nvarchar(64), @network nvarchar(max),
                        @query_vector nvarchar(max) OUTPUT,
                        @excluded nvarchar(max) OUTPUT, @error nvarchar(4000) OUTPUT',
            @query_hex = @query_hex,
            @backbone = @backbone,
            @network = @network,
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
                      ELSE 1 - VECTOR_DISTANCE('cosine', v.embedding, @q) END AS score
          FROM dbo.feature_vectors AS v
          WHERE v.backbone = @backbone AND NOT EXISTS (
              SELECT 1 FROM OPENJSON(@excluded) WITH (image_id int '$') AS x WHERE x.image_id = v.image_id)) AS d
    ORDER BY d.score DESC, d.image_id;
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
