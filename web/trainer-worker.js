// The page's training worker: the same package, training the rounds the page hands it
// (`Trainer.connect`'s `worker` option), so that the page's main thread keeps only the
// network and the UI.
import init, { runTrainer } from './pkg/swarmtrain.js';

await init();
runTrainer();
