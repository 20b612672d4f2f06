-- TrainModel: a linear SVM (C by cross-validation) and a pair metric on the training split, stored as a
-- new version in models/model_arrays. Conventions: see SQLR/04_FeaturizeImages.sql.
CREATE OR ALTER PROCEDURE dbo.TrainModel
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @c_grid nvarchar(400) = N'',
    @seed int = 0,
    @model_version int = NULL OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @c_grid IS NULL OR (@c_grid <> N'' AND ISJSON(@c_grid) = 0)
        THROW 50031, N'TrainModel: C grid must be a JSON list of numbers, or empty for the default.', 1;
    IF @seed IS NULL OR @seed < 0
        THROW 50032, N'TrainModel: seed must be 0 or more.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.splits)
        THROW 50033, N'TrainModel: no train/test split; run PrepareData first.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.features WHERE backbone = @backbone)
        THROW 50034, N'TrainModel: no features for this backbone; run FeaturizeImages first.', 1;

    DECLARE @error nvarchar(4000), @classes nvarchar(max), @model_params nvarchar(max);
    CREATE TABLE #step (backbone nvarchar(64) NOT NULL);
    INSERT INTO #step (backbone) VALUES (@backbone);
    CREATE TABLE #arrays (name nvarchar(64) NOT NULL, dtype nvarchar(16) NOT NULL, shape nvarchar(64) NOT NULL,
                          data varchar(max) NOT NULL);
    BEGIN TRY
        INSERT INTO #arrays (name, dtype, shape, data)
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
# output variables are set on every path (Known issues for Python and R)
classes = model_params = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet, classes, model_params = inproc.train_model(InputDataSet, backbone, c_grid, seed)
error = report.error
',
            @input_data_1 = N'
SELECT i.id AS image_id, i.label, i.dhash, CONVERT(varchar(max), f.vector, 2) AS vector
FROM dbo.images AS i
JOIN dbo.splits AS p ON p.image_id = i.id
JOIN dbo.features AS f ON f.image_id = i.id
JOIN #step AS s ON f.backbone = s.backbone
WHERE p.subset = ''train''
ORDER BY i.id',
            @params = N'@backbone nvarchar(64), @c_grid nvarchar(400), @seed int,
                        @classes nvarchar(max) OUTPUT, @model_params nvarchar(max) OUTPUT, @error nvarchar(4000) OUTPUT',
            @backbone = @backbone,
            @c_grid = @c_grid,
            @seed = @seed,
            @classes = @classes OUTPUT,
            @model_params = @model_params OUTPUT,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NULL AND (NOT EXISTS (SELECT 1 FROM #arrays) OR ISJSON(@classes) IS NULL OR ISJSON(@classes) = 0
                           OR ISJSON(@model_params) IS NULL OR ISJSON(@model_params) = 0)
        SET @error = N'the engine returned no model';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'TrainModel: ', @error);
        THROW 50035, @error, 1;
    END;

    BEGIN TRANSACTION;
    INSERT INTO dbo.models (backbone, classes, params) VALUES (@backbone, @classes, @model_params);
    SET @model_version = CAST(SCOPE_IDENTITY() AS int);
    INSERT INTO dbo.model_arrays (version, name, dtype, shape, data)
    SELECT @model_version, a.name, a.dtype, a.shape, CONVERT(varbinary(max), a.data, 2) FROM #arrays AS a;
    COMMIT TRANSACTION;
    IF OBJECT_ID(N'dbo.StoreMethodVectors', N'P') IS NOT NULL  -- SQL Server 2025: SQLR/12_Vectors.sql
        EXEC dbo.StoreMethodVectors @model_version = @model_version;
    SELECT @model_version AS model_version, @backbone AS backbone, @model_params AS params;
END;
GO
