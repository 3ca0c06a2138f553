"""Interactive naming (Hamidi-Haines et al. 2018): pools of activation maps, annotators' boards that group them
into named visual concepts, unit descriptions, suggested groups, and the study's measures. Qt-free: the naming
board in `app/ui/board/` is a view over these functions.

Three homes, one name to import them by (`from app import naming`):
- `app.project.naming`: what is stored (pools, boards, names and descriptions), each edit one transaction;
- `app.naming.compute`: building pools by running the model (gradient x activation, region features), pictures;
- `app.naming.suggest` (clustering suggestions) and `app.naming.study` (agreement between annotators).
"""
from __future__ import annotations

from app.project.naming import (  # noqa: F401
    POOL_KINDS,
    UNCLEAR_NAME,
    POOLS_DIR,
    PoolInfo,
    PoolMap,
    GroupInfo,
    GroupSnapshot,
    BoardState,
    pools,
    pool_info,
    pool_maps,
    PoolArrays,
    image_path,
    image_paths,
    write_pool,
    rename_pool,
    delete_pool,
    create_group,
    unclear_group,
    rename_group,
    move_maps,
    assign_maps,
    set_unclear,
    group_snapshot,
    assignment,
    delete_group,
    restore_groups,
    merge_groups,
    split_group,
    ensure_board,
    unit_annotations,
    unit_name,
    set_unit_name,
    add_description,
    edit_description,
    delete_annotation,
    restore_annotation,
    automatic_labels,
    DescriptionSuggestion,
    description_suggestions,
    annotators,
    latest_annotator,
    latest_pool,
)
from app.naming.compute import (  # noqa: F401
    PoolSpec,
    build_pool,
    PoolJob,
    FeaturesJob,
    compute_features,
    gradient_x_activation,
    region_features,
    MapPictures,
    Exemplar,
    unit_exemplars,
)
from app.naming.suggest import (  # noqa: F401
    Suggestion,
    SuggestJob,
    suggest_groups,
)
from app.naming.study import (  # noqa: F401
    StudyReport,
    StudyJob,
    SummaryRow,
    N_BOOT,
    N_SHUFFLES,
    board_partitions,
    automatic_partitions,
    study_report,
)
