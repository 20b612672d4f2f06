-- Initial_Run_Once: every step after the images are loaded: featurize, split, train, evaluate. With
-- XACT_ABORT ON the first step that fails stops the run (each step THROWs one line and keeps stored data as it
-- was; featurized batches stay, so a re-run goes on where it stopped).
-- The steps are pipeline/steps.py's JOB, in its order, as in `image-similarity run` and PostgreSQL's
-- initial_run_once (tests/test_steps.py checks the EXECs below against it).
CREATE OR ALTER PROCEDURE dbo.Initial_Run_Once
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @test_fraction float = 0.25,
    @seed int = 0
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @model_version int, @evaluation_id int;
    EXEC dbo.FeaturizeImages @backbone = @backbone;
    EXEC dbo.PrepareData @test_fraction = @test_fraction, @seed = @seed;
    EXEC dbo.TrainModel @backbone = @backbone, @seed = @seed, @model_version = @model_version OUTPUT;
    EXEC dbo.EvaluateModel @model_version = @model_version, @seed = @seed, @evaluation_id = @evaluation_id OUTPUT;
    SELECT m.version AS model_version, m.backbone, e.id AS evaluation_id,
           JSON_VALUE(e.summary, N'$.test_accuracy') AS test_accuracy,
           JSON_VALUE(e.summary, N'$.best_method') AS best_method
    FROM dbo.models AS m JOIN dbo.evaluations AS e ON e.model_version = m.version
    WHERE e.id = @evaluation_id;
END;
GO
