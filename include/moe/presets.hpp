#pragma once
// Every named router (docs/routers.md): the papers' routers and the released models' routers.
#include "moe/presets/papers.hpp"
#include "moe/presets/released.hpp"
