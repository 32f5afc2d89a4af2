"""The commands of `exceiver`, by what they do: `training` (make models), `inference` (run a
model on cells) and `evaluation` (judge models). Each command has an `add_<command>(commands)`
that declares its options, beside `<command>_settings(args)` (the keyword arguments its Python
function receives) and `run_<command>(args)`. Declaring options imports nothing heavy; handlers
import what they need."""
