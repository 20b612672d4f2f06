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
-- @backbone: a pretrained network, or a refined one (RefineModel) whose weights cross as @network: see ResolveBackbone.
CREATE OR ALTER PROCEDURE dbo.FeaturizeImages
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @batch_size int = 32
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @network nvarchar(max);
    EXEC dbo.ResolveBackbone @backbone = @backbone, @caller = N'FeaturizeImages', @network = @network OUTPUT;
    IF @batch_size IS NULL OR @batch_size < 1 OR @batch_size > 1024
        THROW 50012, N'FeaturizeImages: batch size must be between 1 and 1024.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.images)
        THROW 50013, N'FeaturizeImages: no images stored; load images first.', 1;

    DECLARE @error nvarchar(4000), @last int = 0, @upto int, @expected int, @featurized int = 0;
    CREATE TABLE #batch (backbone nvarchar(64) NOT NULL, after_id int NOT NULL, upto_id int NOT NULL);
    CREATE TABLE #vectors (image_id int NOT NULL, dim int NULL, vector varchar(max) NULL, reason nvarchar(400) NULL,
                           precision_used nvarchar(8) NULL, runtime nvarchar(16) NULL, network_hash varchar(64) NULL);
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
            INSERT INTO #vectors (image_id, dim, vector, reason, precision_used, runtime, network_hash)
            EXEC sp_execute_external_script
                @language = N'Python',
                @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.featurize_images(InputDataSet, backbone, network)
error = report.error
',
                @input_data_1 = N'
SELECT i.id, CONVERT(varchar(max), i.data, 2) AS data
FROM dbo.images AS i JOIN #batch AS b ON i.id > b.after_id AND i.id <= b.upto_id
WHERE NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = i.id AND f.backbone = b.backbone)
ORDER BY i.id',
                @params = N'@backbone nvarchar(64), @network nvarchar(max), @error nvarchar(4000) OUTPUT',
                @backbone = @backbone,
                @network = @network,
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
        -- the engine sends '' and 0 for what is absent (no NULL or NaN in OutputDataSet: their mapping is undocumented)
        UPDATE #vectors SET dim = NULLIF(dim, 0), vector = NULLIF(vector, ''), reason = NULLIF(reason, N'');
        IF (SELECT COUNT(*) FROM #vectors) <> @expected
            OR EXISTS (SELECT 1 FROM #vectors WHERE (vector IS NULL AND reason IS NULL) OR LEN(vector) <> 8 * dim)
            THROW 50015, N'FeaturizeImages: the engine did not return one vector or one reason per image; nothing of this batch was stored.', 1;
        -- a catalogue never mixes vectors of two networks (issue 28: docs/runtimes.md), as the engine's featurize refuses
        DECLARE @stored varchar(64) = NULL, @computed varchar(64) = NULL;
        SELECT TOP (1) @computed = v.network_hash FROM #vectors AS v WHERE v.vector IS NOT NULL;
        SELECT TOP (1) @stored = r.network_hash FROM dbo.feature_runtimes AS r
        WHERE r.backbone = @backbone AND r.network_hash <> @computed;
        IF @stored IS NOT NULL
        BEGIN
            SET @error = CONCAT(N'FeaturizeImages: the stored ', @backbone, N' features were computed by another ',
                                N'network (weights hash ', @stored, N') than this one (', @computed,
                                N'); nothing of this batch was stored.');
            THROW 50080, @error, 1;
        END;

        BEGIN TRANSACTION;
        INSERT INTO dbo.features (image_id, backbone, dim, vector)
        SELECT v.image_id, @backbone, v.dim, CONVERT(varbinary(max), v.vector, 2) FROM #vectors AS v
        WHERE v.vector IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = v.image_id AND f.backbone = @backbone);
        -- what computed each vector (issue 28: docs/runtimes.md); rows of vectors stored before are kept as they were
        INSERT INTO dbo.feature_precisions (image_id, backbone, precision_used)
        SELECT v.image_id, @backbone, v.precision_used FROM #vectors AS v
        WHERE v.vector IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM dbo.feature_precisions AS p WHERE p.image_id = v.image_id AND p.backbone = @backbone);
        INSERT INTO dbo.feature_runtimes (image_id, backbone, runtime, network_hash)
        SELECT v.image_id, @backbone, v.runtime, v.network_hash FROM #vectors AS v
        WHERE v.vector IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM dbo.feature_runtimes AS r WHERE r.image_id = v.image_id AND r.backbone = @backbone);
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
-- ResolveBackbone: what a procedure that runs the network on images (FeaturizeImages, RankCandidates) hands its
-- external script for @backbone. A pretrained backbone: @network NULL. A network in dbo.networks with status
-- 'ready': @network is one JSON text {"base", "version", "status", "params", "weights": [{"key", "dtype", "shape",
-- "data"}, ...]} holding its 'weights' rows of dbo.network_arrays, data as hexadecimal text (never varbinary).
-- Anything else is a one-line THROW naming @caller.
CREATE OR ALTER PROCEDURE dbo.ResolveBackbone
    @backbone nvarchar(128),
    @caller nvarchar(64),
    @network nvarchar(max) = NULL OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @error nvarchar(4000);
    SET @network = NULL;
    IF @backbone IN (N'efficientnet_lite0', N'mobilenet_v2', N'resnet18', N'resnet50', N'resnet101')
        RETURN;
    IF @backbone IS NULL OR NOT EXISTS (SELECT 1 FROM dbo.networks WHERE name = @backbone)
    BEGIN
        SET @error = CONCAT(@caller, N': unknown backbone; use a pretrained one (efficientnet_lite0, mobilenet_v2, ',
                            N'resnet18, resnet50, resnet101) or a network that RefineModel stored.');
        THROW 50016, @error, 1;
    END;
    IF EXISTS (SELECT 1 FROM dbo.networks WHERE name = @backbone AND status <> 'ready')
    BEGIN
        SET @error = CONCAT(@caller, N': network ', @backbone,
                            N' is still training; run ''image-similarity refine'' again to finish it.');
        THROW 50017, @error, 1;
    END;
    SET @network = (
        SELECT n.base, n.version, n.status, JSON_QUERY(n.params) AS params,
               (SELECT a.[key], a.dtype, a.shape, CONVERT(varchar(max), a.data, 2) AS data
                FROM dbo.network_arrays AS a
                WHERE a.network = n.name AND a.kind = 'weights'
                ORDER BY a.[key]
                FOR JSON PATH) AS weights
        FROM dbo.networks AS n
        WHERE n.name = @backbone
        FOR JSON PATH, WITHOUT_ARRAY_WRAPPER);
END;
GO
